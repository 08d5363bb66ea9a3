#include "io/h5.hpp"

#include <hdf5_hl.h>

#include <cerrno>
#include <cstring>
#include <limits>

#include "common/atomic_file.hpp"
#include "common/error.hpp"
#include "common/half.hpp"
#include "common/memory.hpp"

namespace hysparse::h5 {
namespace {

[[noreturn]] void fail_object(const std::string& file, const std::string& object, const std::string& what) {
  fail_input(file, object, "{}", what);
}

// Why a write through libhdf5 failed: libhdf5 keeps the system's errno of the failed write(2).
std::string write_failure_reason() {
  const int error_number = errno;
  switch (error_number) {
    case ENOSPC: return "no space left on the device (disk full)";
    case EDQUOT: return "disk quota exceeded";
    case EFBIG: return "file too large (the file-size limit, ulimit -f, or the file system's maximum)";
    case EROFS: return "read-only file system";
    case EIO: return "input/output error";
    case EACCES: case EPERM: return "permission denied";
    case ENOENT: return "the directory does not exist";
    default: return "disk full or not writable?";
  }
}

// A read that failed: when the file changed under us, that is the reason to report.
[[noreturn]] void fail_read(const std::string& file, const std::string& object, const std::string& what) {
  check_inputs_unchanged();
  fail_input(file, object, "{}", what);
}

// Bytes for `count` elements of `element_size`, refused before allocating when they do not fit.
void require_read_memory(const std::string& file, const std::string& object, std::uint64_t count,
                         std::uint64_t element_size) {
  require_memory(checked_mul(count, element_size, "dataset size in bytes"), fmt::format("{}: reading {}", file, object));
}

Handle make_plist(hid_t plist_class) {
  Handle plist(H5Pcreate(plist_class));
  H5Pset_obj_track_times(plist.id(), false);  // byte-identical files for identical inputs
  return plist;
}

Handle open_attribute(const File& file, const std::string& object_path, const std::string& name) {
  if (!has_attribute(file, object_path, name)) {
    fail_object(file.path(), object_path, fmt::format("missing attribute '{}'", name));
  }
  Handle attribute(H5Aopen_by_name(file.id(), object_path.c_str(), name.c_str(), H5P_DEFAULT, H5P_DEFAULT));
  if (!attribute.valid()) fail_object(file.path(), object_path, fmt::format("cannot open attribute '{}'", name));
  return attribute;
}

std::uint64_t point_count(hid_t space) {
  const hssize_t n = H5Sget_simple_extent_npoints(space);
  return n < 0 ? 0 : static_cast<std::uint64_t>(n);
}

std::string attribute_where(const std::string& object_path, const std::string& name) {
  return object_path == "/" ? "attribute '" + name + "'" : object_path + " attribute '" + name + "'";
}

Handle half_type() {
  // IEEE binary16, the layout h5py writes for numpy.float16.
  Handle type(H5Tcopy(H5T_IEEE_F32LE));
  H5Tset_fields(type.id(), 15, 10, 5, 0, 10);
  H5Tset_precision(type.id(), 16);
  H5Tset_size(type.id(), 2);
  H5Tset_ebias(type.id(), 15);
  return type;
}

Handle utf8_vlen_string_type() {
  Handle type(H5Tcopy(H5T_C_S1));
  H5Tset_size(type.id(), H5T_VARIABLE);
  H5Tset_cset(type.id(), H5T_CSET_UTF8);
  return type;
}

void delete_attribute_if_present(const File& file, const std::string& object_path, const std::string& name) {
  if (has_attribute(file, object_path, name)) {
    H5Adelete_by_name(file.id(), object_path.c_str(), name.c_str(), H5P_DEFAULT);
  }
}

void write_attribute_raw(const File& file, const std::string& object_path, const std::string& name, hid_t file_type,
                         hid_t mem_type, hid_t space, const void* data) {
  delete_attribute_if_present(file, object_path, name);
  Handle plist = make_plist(H5P_ATTRIBUTE_CREATE);
  Handle attribute(H5Acreate_by_name(file.id(), object_path.c_str(), name.c_str(), file_type, space, H5P_DEFAULT,
                                     H5P_DEFAULT, H5P_DEFAULT));
  errno = 0;
  if (!attribute.valid() || (point_count(space) > 0 && H5Awrite(attribute.id(), mem_type, data) < 0)) {
    fail(ErrorKind::kOutput, "{}: cannot write {}: {}", file.path(), attribute_where(object_path, name),
         write_failure_reason());
  }
}

Handle simple_space(const std::vector<std::uint64_t>& dims) {
  std::vector<hsize_t> h(dims.begin(), dims.end());
  return Handle(H5Screate_simple(static_cast<int>(h.size()), h.data(), nullptr));
}

void create_parent_groups(const File& file, const std::string& path) {
  for (std::size_t pos = path.find('/', 1); pos != std::string::npos; pos = path.find('/', pos + 1)) {
    const std::string parent = path.substr(0, pos);
    if (!link_exists(file.id(), parent)) create_group(file, parent);
  }
}

void write_dataset_raw(const File& file, const std::string& path, const std::vector<std::uint64_t>& dims,
                       hid_t file_type, hid_t mem_type, const void* data, const WriteOptions& options) {
  create_parent_groups(file, path);
  Handle space = simple_space(dims);
  Handle dcpl = make_plist(H5P_DATASET_CREATE);
  if (!options.chunk.empty()) {
    std::vector<hsize_t> chunk(options.chunk.begin(), options.chunk.end());
    for (std::size_t i = 0; i < chunk.size() && i < dims.size(); ++i) {
      chunk[i] = std::max<hsize_t>(1, std::min<hsize_t>(chunk[i], dims[i]));
    }
    H5Pset_chunk(dcpl.id(), static_cast<int>(chunk.size()), chunk.data());
    if (options.shuffle) H5Pset_shuffle(dcpl.id());
    if (options.gzip_level > 0) H5Pset_deflate(dcpl.id(), static_cast<unsigned>(options.gzip_level));
  }
  errno = 0;
  Handle dataset(H5Dcreate2(file.id(), path.c_str(), file_type, space.id(), H5P_DEFAULT, dcpl.id(), H5P_DEFAULT));
  if (!dataset.valid()) fail(ErrorKind::kOutput, "{}: {}: cannot create dataset: {}", file.path(), path, write_failure_reason());
  if (point_count(space.id()) > 0 && H5Dwrite(dataset.id(), mem_type, H5S_ALL, H5S_ALL, H5P_DEFAULT, data) < 0) {
    fail(ErrorKind::kOutput, "{}: {}: cannot write dataset: {}", file.path(), path, write_failure_reason());
  }
}

}  // namespace

void Handle::reset() {
  if (id_ < 0) return;
  switch (H5Iget_type(id_)) {
    case H5I_FILE: H5Fclose(id_); break;
    case H5I_GROUP: H5Gclose(id_); break;
    case H5I_DATASET: H5Dclose(id_); break;
    case H5I_DATASPACE: H5Sclose(id_); break;
    case H5I_DATATYPE: H5Tclose(id_); break;
    case H5I_ATTR: H5Aclose(id_); break;
    case H5I_GENPROP_LST: H5Pclose(id_); break;
    default: H5Oclose(id_); break;
  }
  id_ = H5I_INVALID_HID;
}

void silence_hdf5_errors() { H5Eset_auto2(H5E_DEFAULT, nullptr, nullptr); }

std::int64_t open_hdf5_objects() {
  const ssize_t count = H5Fget_obj_count(H5F_OBJ_ALL, H5F_OBJ_ALL);
  return count < 0 ? 0 : static_cast<std::int64_t>(count);
}

const char* to_string(ElementType type) {
  switch (type) {
    case ElementType::kFloat32: return "float32";
    case ElementType::kFloat16: return "float16";
    case ElementType::kBFloat16: return "bfloat16";
    case ElementType::kFloat64: return "float64";
    case ElementType::kInt32: return "int32";
    case ElementType::kInt64: return "int64";
    case ElementType::kUInt16: return "uint16";
    case ElementType::kOther: return "other";
  }
  return "other";
}

File File::open_read(const std::string& path) {
  silence_hdf5_errors();
  File file;
  file.path_ = path;
  std::FILE* probe = std::fopen(path.c_str(), "rb");
  if (!probe) fail(ErrorKind::kInput, "{}: cannot open for reading (missing file or no permission)", path);
  std::fclose(probe);
  watch_input(path);  // a capture rewritten while we read it is an error, not a silently mixed result
  if (H5Fis_hdf5(path.c_str()) <= 0) {
    fail(ErrorKind::kInput, "{}: not an HDF5 file (no HDF5 signature; truncated or wrong format)", path);
  }
  file.handle_ = Handle(H5Fopen(path.c_str(), H5F_ACC_RDONLY, H5P_DEFAULT));
  if (!file.handle_.valid()) fail(ErrorKind::kInput, "{}: cannot open as HDF5 (truncated or corrupted file)", path);
  return file;
}

File File::create(const std::string& path) {
  silence_hdf5_errors();
  File file;
  file.path_ = path;
  Handle fcpl = make_plist(H5P_FILE_CREATE);
  errno = 0;
  file.handle_ = Handle(H5Fcreate(path.c_str(), H5F_ACC_TRUNC, fcpl.id(), H5P_DEFAULT));
  if (!file.handle_.valid()) fail(ErrorKind::kOutput, "{}: cannot create file: {}", path, write_failure_reason());
  file.writable_ = true;
  return file;
}

File::~File() {
  if (writable_ && handle_.valid()) (void)handle_.release();
}

void File::flush() {
  if (!handle_.valid()) return;
  errno = 0;
  if (H5Fflush(handle_.id(), H5F_SCOPE_GLOBAL) < 0) {
    const std::string reason = write_failure_reason();
    if (writable_) (void)handle_.release();
    fail(ErrorKind::kOutput, "{}: cannot write: {}", path_, reason);
  }
}

void File::close() {
  if (!handle_.valid()) return;
  // Everything reaches the disk first: a flush that fails leaves libhdf5's file intact to abandon,
  // whereas a close that fails half-way leaves it corrupted.
  if (writable_) flush();
  errno = 0;
  const herr_t status = H5Fclose(handle_.release());
  if (status < 0) fail(ErrorKind::kOutput, "{}: cannot close: {}", path_, write_failure_reason());
}

bool link_exists(hid_t loc, const std::string& path) {
  if (path.empty() || path == "/") return true;
  std::size_t pos = path[0] == '/' ? 1 : 0;
  while (true) {
    const std::size_t next = path.find('/', pos);
    const std::string prefix = path.substr(0, next);
    if (H5Lexists(loc, prefix.c_str(), H5P_DEFAULT) <= 0) return false;
    if (next == std::string::npos) return true;
    H5O_info_t info;
    if (H5Oget_info_by_name(loc, prefix.c_str(), &info, H5P_DEFAULT) < 0 || info.type != H5O_TYPE_GROUP) return false;
    pos = next + 1;
  }
}

namespace {
bool object_type_is(hid_t loc, const std::string& path, H5O_type_t type) {
  if (!link_exists(loc, path)) return false;
  H5O_info_t info;
  if (H5Oget_info_by_name(loc, path.c_str(), &info, H5P_DEFAULT) < 0) return false;
  return info.type == type;
}
}  // namespace

bool is_group(hid_t loc, const std::string& path) { return object_type_is(loc, path, H5O_TYPE_GROUP); }
bool is_dataset(hid_t loc, const std::string& path) { return object_type_is(loc, path, H5O_TYPE_DATASET); }

Handle open_group(const File& file, const std::string& path) {
  if (!is_group(file.id(), path)) fail_object(file.path(), path, "missing group");
  return Handle(H5Gopen2(file.id(), path.c_str(), H5P_DEFAULT));
}

Handle create_group(const File& file, const std::string& path) {
  if (is_group(file.id(), path)) return open_group(file, path);
  create_parent_groups(file, path);
  Handle gcpl = make_plist(H5P_GROUP_CREATE);
  Handle group(H5Gcreate2(file.id(), path.c_str(), H5P_DEFAULT, gcpl.id(), H5P_DEFAULT));
  if (!group.valid()) fail(ErrorKind::kOutput, "{}: {}: cannot create group: {}", file.path(), path, write_failure_reason());
  return group;
}

std::vector<std::string> list_children(const File& file, const std::string& group_path) {
  Handle group = open_group(file, group_path);
  H5G_info_t info;
  if (H5Gget_info(group.id(), &info) < 0) fail_object(file.path(), group_path, "cannot list group");
  std::vector<std::string> names;
  for (hsize_t i = 0; i < info.nlinks; ++i) {
    const ssize_t size = H5Lget_name_by_idx(group.id(), ".", H5_INDEX_NAME, H5_ITER_INC, i, nullptr, 0, H5P_DEFAULT);
    if (size < 0) continue;
    std::string name(static_cast<std::size_t>(size), '\0');
    H5Lget_name_by_idx(group.id(), ".", H5_INDEX_NAME, H5_ITER_INC, i, name.data(),
                       static_cast<std::size_t>(size) + 1, H5P_DEFAULT);
    names.push_back(name);
  }
  return names;
}

bool has_attribute(const File& file, const std::string& object_path, const std::string& name) {
  if (!link_exists(file.id(), object_path)) return false;
  return H5Aexists_by_name(file.id(), object_path.c_str(), name.c_str(), H5P_DEFAULT) > 0;
}

std::vector<std::string> read_string_list_attribute(const File& file, const std::string& object_path,
                                                    const std::string& name) {
  Handle attribute = open_attribute(file, object_path, name);
  Handle type(H5Aget_type(attribute.id()));
  Handle space(H5Aget_space(attribute.id()));
  const std::string where = attribute_where(object_path, name);
  if (H5Tget_class(type.id()) != H5T_STRING) {
    fail_object(file.path(), where, "has a non-string type (expected a string)");
  }
  const std::uint64_t n = point_count(space.id());
  std::vector<std::string> values;
  if (H5Tis_variable_str(type.id()) > 0) {
    Handle memtype(H5Tcopy(H5T_C_S1));
    H5Tset_size(memtype.id(), H5T_VARIABLE);
    H5Tset_cset(memtype.id(), H5Tget_cset(type.id()));
    require_read_memory(file.path(), where, n, sizeof(char*));
    std::vector<char*> pointers(n, nullptr);
    if (n > 0 && H5Aread(attribute.id(), memtype.id(), pointers.data()) < 0) {
      fail_object(file.path(), where, "cannot read string");
    }
    for (char* p : pointers) {
      values.emplace_back(p ? p : "");
      if (p) H5free_memory(p);
    }
  } else {
    const std::size_t size = H5Tget_size(type.id());
    require_read_memory(file.path(), where, checked_mul(n, size, "string attribute size") + 1, 1);
    std::vector<char> buffer(n * size + 1, '\0');
    if (n > 0 && H5Aread(attribute.id(), type.id(), buffer.data()) < 0) {
      fail_object(file.path(), where, "cannot read string");
    }
    for (std::uint64_t i = 0; i < n; ++i) {
      std::string value(buffer.data() + i * size, size);
      value.erase(value.find_last_not_of(std::string("\0 ", 2)) + 1);
      values.push_back(value);
    }
  }
  return values;
}

std::string read_string_attribute(const File& file, const std::string& object_path, const std::string& name) {
  auto values = read_string_list_attribute(file, object_path, name);
  if (values.size() != 1) {
    fail_object(file.path(), attribute_where(object_path, name),
                fmt::format("holds {} strings (expected one)", values.size()));
  }
  return values[0];
}

std::vector<std::int64_t> read_int_list_attribute(const File& file, const std::string& object_path,
                                                  const std::string& name) {
  Handle attribute = open_attribute(file, object_path, name);
  Handle type(H5Aget_type(attribute.id()));
  Handle space(H5Aget_space(attribute.id()));
  const std::string where = attribute_where(object_path, name);
  if (H5Tget_class(type.id()) != H5T_INTEGER) fail_object(file.path(), where, "is not an integer (expected an integer)");
  require_read_memory(file.path(), where, point_count(space.id()), sizeof(std::int64_t));
  std::vector<std::int64_t> values(point_count(space.id()));
  if (!values.empty() && H5Aread(attribute.id(), H5T_NATIVE_INT64, values.data()) < 0) {
    fail_object(file.path(), where, "cannot read integer (out of the int64 range?)");
  }
  return values;
}

std::int64_t read_int_attribute(const File& file, const std::string& object_path, const std::string& name) {
  auto values = read_int_list_attribute(file, object_path, name);
  if (values.size() != 1) {
    fail_object(file.path(), attribute_where(object_path, name),
                fmt::format("holds {} values (expected one integer)", values.size()));
  }
  return values[0];
}

double read_double_attribute(const File& file, const std::string& object_path, const std::string& name) {
  Handle attribute = open_attribute(file, object_path, name);
  Handle type(H5Aget_type(attribute.id()));
  Handle space(H5Aget_space(attribute.id()));
  const std::string where = attribute_where(object_path, name);
  const H5T_class_t type_class = H5Tget_class(type.id());
  if (type_class != H5T_FLOAT && type_class != H5T_INTEGER) {
    fail_object(file.path(), where, "is not a number (expected a float)");
  }
  if (point_count(space.id()) != 1) fail_object(file.path(), where, "holds several values (expected one number)");
  double value = 0;
  if (H5Aread(attribute.id(), H5T_NATIVE_DOUBLE, &value) < 0) fail_object(file.path(), where, "cannot read number");
  return value;
}

void write_attribute(const File& file, const std::string& object_path, const std::string& name,
                     const std::string& value) {
  Handle type = utf8_vlen_string_type();
  Handle space(H5Screate(H5S_SCALAR));
  const char* pointer = value.c_str();
  write_attribute_raw(file, object_path, name, type.id(), type.id(), space.id(), &pointer);
}

void write_attribute(const File& file, const std::string& object_path, const std::string& name, const char* value) {
  write_attribute(file, object_path, name, std::string(value));
}

void write_attribute(const File& file, const std::string& object_path, const std::string& name, std::int64_t value) {
  Handle space(H5Screate(H5S_SCALAR));
  write_attribute_raw(file, object_path, name, H5T_STD_I64LE, H5T_NATIVE_INT64, space.id(), &value);
}

void write_attribute(const File& file, const std::string& object_path, const std::string& name, double value) {
  Handle space(H5Screate(H5S_SCALAR));
  write_attribute_raw(file, object_path, name, H5T_IEEE_F64LE, H5T_NATIVE_DOUBLE, space.id(), &value);
}

void write_attribute(const File& file, const std::string& object_path, const std::string& name,
                     const std::vector<std::string>& values) {
  Handle type = utf8_vlen_string_type();
  Handle space = simple_space({values.size()});
  std::vector<const char*> pointers;
  for (const auto& v : values) pointers.push_back(v.c_str());
  write_attribute_raw(file, object_path, name, type.id(), type.id(), space.id(), pointers.data());
}

void write_attribute(const File& file, const std::string& object_path, const std::string& name,
                     const std::vector<std::int64_t>& values) {
  Handle space = simple_space({values.size()});
  write_attribute_raw(file, object_path, name, H5T_STD_I64LE, H5T_NATIVE_INT64, space.id(), values.data());
}

void write_attribute(const File& file, const std::string& object_path, const std::string& name,
                     const std::vector<double>& values) {
  Handle space = simple_space({values.size()});
  write_attribute_raw(file, object_path, name, H5T_IEEE_F64LE, H5T_NATIVE_DOUBLE, space.id(), values.data());
}

std::uint64_t DatasetInfo::element_count() const {
  std::uint64_t count = 1;
  for (std::uint64_t d : dims) {
    if (d != 0 && count > std::numeric_limits<std::uint64_t>::max() / d) {
      throw Error(ErrorKind::kInput, fmt::format("{}: dimensions overflow a 64-bit element count (expected a "
                                                 "product of dimensions below 2^64)", where));
    }
    count *= d;
  }
  return count;
}

DatasetInfo dataset_info(const File& file, const std::string& path) {
  if (!is_dataset(file.id(), path)) fail_object(file.path(), path, "missing dataset");
  Handle dataset(H5Dopen2(file.id(), path.c_str(), H5P_DEFAULT));
  if (!dataset.valid()) fail_object(file.path(), path, "cannot open dataset");
  Handle space(H5Dget_space(dataset.id()));
  Handle type(H5Dget_type(dataset.id()));
  DatasetInfo info;
  info.where = file.path() + ": " + path;
  const int rank = H5Sget_simple_extent_ndims(space.id());
  if (rank < 0) fail_object(file.path(), path, "unreadable dataspace");
  std::vector<hsize_t> dims(static_cast<std::size_t>(rank));
  H5Sget_simple_extent_dims(space.id(), dims.data(), nullptr);
  info.dims.assign(dims.begin(), dims.end());
  const H5T_class_t type_class = H5Tget_class(type.id());
  const std::size_t size = H5Tget_size(type.id());
  if (type_class == H5T_FLOAT) {
    info.type_description = fmt::format("{}-bit float", size * 8);
    if (size == 4) info.element_type = ElementType::kFloat32;
    if (size == 8) info.element_type = ElementType::kFloat64;
    if (size == 2) {
      size_t spos, epos, esize, mpos, msize;
      H5Tget_fields(type.id(), &spos, &epos, &esize, &mpos, &msize);
      if (esize == 5 && msize == 10) info.element_type = ElementType::kFloat16;
      else info.type_description = fmt::format("16-bit float with {} exponent bits", esize);
    }
  } else if (type_class == H5T_INTEGER) {
    const bool is_signed = H5Tget_sign(type.id()) == H5T_SGN_2;
    info.type_description = fmt::format("{}{}-bit integer", is_signed ? "" : "unsigned ", size * 8);
    if (is_signed && size == 4) info.element_type = ElementType::kInt32;
    if (is_signed && size == 8) info.element_type = ElementType::kInt64;
    if (!is_signed && size == 2) {
      info.element_type = ElementType::kUInt16;
      if (has_attribute(file, path, "dtype")) {
        Handle attribute(H5Aopen_by_name(file.id(), path.c_str(), "dtype", H5P_DEFAULT, H5P_DEFAULT));
        Handle attr_type(H5Aget_type(attribute.id()));
        if (H5Tget_class(attr_type.id()) == H5T_STRING && read_string_attribute(file, path, "dtype") == "bfloat16") {
          info.element_type = ElementType::kBFloat16;
          info.type_description = "bfloat16 (uint16 storage)";
        }
      }
    }
  } else {
    info.type_description = "non-numeric type";
  }
  return info;
}

void read_floats(const File& file, const std::string& path, const DatasetInfo& info, float* out,
                 const std::vector<std::uint64_t>& offset, const std::vector<std::uint64_t>& count) {
  Handle dataset(H5Dopen2(file.id(), path.c_str(), H5P_DEFAULT));
  if (!dataset.valid()) fail_object(file.path(), path, "cannot open dataset");
  Handle file_space(H5Dget_space(dataset.id()));
  std::uint64_t elements = info.element_count();
  Handle mem_space;
  if (!offset.empty()) {
    std::vector<hsize_t> start(offset.begin(), offset.end()), extent(count.begin(), count.end());
    H5Sselect_hyperslab(file_space.id(), H5S_SELECT_SET, start.data(), nullptr, extent.data(), nullptr);
    elements = 1;
    for (auto c : count) elements *= c;
    mem_space = Handle(H5Screate_simple(static_cast<int>(extent.size()), extent.data(), nullptr));
  } else {
    mem_space = Handle(H5Scopy(file_space.id()));
  }
  if (elements == 0) return;
  herr_t status;
  switch (info.element_type) {
    case ElementType::kFloat32:
    case ElementType::kFloat16:
    case ElementType::kFloat64:
      // HDF5 converts any IEEE float layout to native float32.
      status = H5Dread(dataset.id(), H5T_NATIVE_FLOAT, mem_space.id(), file_space.id(), H5P_DEFAULT, out);
      break;
    case ElementType::kBFloat16: {
      // A whole dataset of rank >= 2 goes one slice of its first dimension at a time (one head of
      // a layer) through a staging buffer of that size, converted by every thread.
      const bool by_slices = offset.empty() && info.dims.size() >= 2 && info.dims[0] > 1;
      const std::uint64_t slices = by_slices ? info.dims[0] : 1, slice = elements / slices;
      require_read_memory(file.path(), path, slice, sizeof(std::uint16_t));  // the uint16 staging buffer
      std::vector<std::uint16_t> raw(slice);
      status = 0;
      for (std::uint64_t i = 0; i < slices && status >= 0; ++i) {
        if (by_slices) {
          std::vector<hsize_t> start(info.dims.size(), 0), extent(info.dims.begin(), info.dims.end());
          start[0] = i;
          extent[0] = 1;
          H5Sselect_hyperslab(file_space.id(), H5S_SELECT_SET, start.data(), nullptr, extent.data(), nullptr);
          mem_space = Handle(H5Screate_simple(static_cast<int>(extent.size()), extent.data(), nullptr));
        }
        status = H5Dread(dataset.id(), H5T_NATIVE_UINT16, mem_space.id(), file_space.id(), H5P_DEFAULT, raw.data());
        float* target = out + i * slice;
        const std::uint16_t* staged = raw.data();
        const auto n = static_cast<std::int64_t>(slice);
#pragma omp parallel for schedule(static) if (n > (1 << 16))
        for (std::int64_t j = 0; j < n; ++j) target[j] = bfloat16_to_float(staged[j]);
      }
      break;
    }
    default:
      fail_object(file.path(), path, fmt::format("has element type {} (expected float32, float16, or bfloat16 "
                                                  "stored as uint16 with attribute dtype=\"bfloat16\")",
                                                  info.type_description));
  }
  if (status < 0) fail_read(file.path(), path, "cannot read data (truncated or corrupted file)");
}

std::vector<std::int64_t> read_ints(const File& file, const std::string& path) {
  DatasetInfo info = dataset_info(file, path);
  Handle dataset(H5Dopen2(file.id(), path.c_str(), H5P_DEFAULT));
  Handle type(H5Dget_type(dataset.id()));
  if (H5Tget_class(type.id()) != H5T_INTEGER) fail_object(file.path(), path, "is not an integer dataset");
  require_read_memory(file.path(), path, info.element_count(), sizeof(std::int64_t));
  std::vector<std::int64_t> values(info.element_count());
  if (!values.empty() && H5Dread(dataset.id(), H5T_NATIVE_INT64, H5S_ALL, H5S_ALL, H5P_DEFAULT, values.data()) < 0) {
    fail_read(file.path(), path, "cannot read data (truncated or corrupted file)");
  }
  return values;
}

std::vector<double> read_doubles(const File& file, const std::string& path) {
  DatasetInfo info = dataset_info(file, path);
  Handle dataset(H5Dopen2(file.id(), path.c_str(), H5P_DEFAULT));
  require_read_memory(file.path(), path, info.element_count(), sizeof(double));
  std::vector<double> values(info.element_count());
  if (!values.empty() && H5Dread(dataset.id(), H5T_NATIVE_DOUBLE, H5S_ALL, H5S_ALL, H5P_DEFAULT, values.data()) < 0) {
    fail_read(file.path(), path, "cannot read data as float64");
  }
  return values;
}

std::string read_string_dataset(const File& file, const std::string& path) {
  if (!is_dataset(file.id(), path)) fail_object(file.path(), path, "missing dataset");
  Handle dataset(H5Dopen2(file.id(), path.c_str(), H5P_DEFAULT));
  Handle type(H5Dget_type(dataset.id()));
  Handle space(H5Dget_space(dataset.id()));
  if (H5Tget_class(type.id()) != H5T_STRING || point_count(space.id()) != 1) {
    fail_object(file.path(), path, "is not a scalar string dataset (expected one string)");
  }
  if (H5Tis_variable_str(type.id()) > 0) {
    Handle memtype(H5Tcopy(H5T_C_S1));
    H5Tset_size(memtype.id(), H5T_VARIABLE);
    H5Tset_cset(memtype.id(), H5Tget_cset(type.id()));
    char* pointer = nullptr;
    if (H5Dread(dataset.id(), memtype.id(), H5S_ALL, H5S_ALL, H5P_DEFAULT, &pointer) < 0) {
      fail_object(file.path(), path, "cannot read string");
    }
    std::string value(pointer ? pointer : "");
    if (pointer) H5free_memory(pointer);
    return value;
  }
  const std::size_t size = H5Tget_size(type.id());
  require_read_memory(file.path(), path, size + 1, 1);
  std::vector<char> buffer(size + 1, '\0');
  if (H5Dread(dataset.id(), type.id(), H5S_ALL, H5S_ALL, H5P_DEFAULT, buffer.data()) < 0) {
    fail_object(file.path(), path, "cannot read string");
  }
  return std::string(buffer.data());
}

void write_floats(const File& file, const std::string& path, const std::vector<std::uint64_t>& dims,
                  const float* data, ElementType element_type, const WriteOptions& options) {
  std::uint64_t n = 1;
  for (auto d : dims) n *= d;
  switch (element_type) {
    case ElementType::kFloat32:
      write_dataset_raw(file, path, dims, H5T_IEEE_F32LE, H5T_NATIVE_FLOAT, data, options);
      break;
    case ElementType::kFloat16: {
      std::vector<std::uint16_t> bits(n);
      for (std::uint64_t i = 0; i < n; ++i) bits[i] = float_to_half(data[i]);
      Handle type = half_type();
      write_dataset_raw(file, path, dims, type.id(), type.id(), bits.data(), options);
      break;
    }
    case ElementType::kBFloat16: {
      std::vector<std::uint16_t> bits(n);
      for (std::uint64_t i = 0; i < n; ++i) bits[i] = float_to_bfloat16(data[i]);
      write_dataset_raw(file, path, dims, H5T_STD_U16LE, H5T_NATIVE_UINT16, bits.data(), options);
      write_attribute(file, path, "dtype", "bfloat16");
      break;
    }
    default: throw Error(ErrorKind::kInternal, "write_floats: unsupported element type");
  }
}

void write_doubles(const File& file, const std::string& path, const std::vector<std::uint64_t>& dims,
                   const double* data, const WriteOptions& options) {
  write_dataset_raw(file, path, dims, H5T_IEEE_F64LE, H5T_NATIVE_DOUBLE, data, options);
}

void write_ints(const File& file, const std::string& path, const std::vector<std::uint64_t>& dims,
                const std::int64_t* data, const WriteOptions& options) {
  write_dataset_raw(file, path, dims, H5T_STD_I64LE, H5T_NATIVE_INT64, data, options);
}

void write_int32s(const File& file, const std::string& path, const std::vector<std::uint64_t>& dims,
                  const std::int32_t* data, const WriteOptions& options) {
  write_dataset_raw(file, path, dims, H5T_STD_I32LE, H5T_NATIVE_INT32, data, options);
}

void write_string_dataset(const File& file, const std::string& path, const std::string& value) {
  create_parent_groups(file, path);
  Handle type = utf8_vlen_string_type();
  Handle space(H5Screate(H5S_SCALAR));
  Handle dcpl = make_plist(H5P_DATASET_CREATE);
  Handle dataset(H5Dcreate2(file.id(), path.c_str(), type.id(), space.id(), H5P_DEFAULT, dcpl.id(), H5P_DEFAULT));
  const char* pointer = value.c_str();
  if (!dataset.valid() || H5Dwrite(dataset.id(), type.id(), H5S_ALL, H5S_ALL, H5P_DEFAULT, &pointer) < 0) {
    fail(ErrorKind::kOutput, "{}: {}: cannot write string dataset: {}", file.path(), path, write_failure_reason());
  }
}

void write_strings(const File& file, const std::string& path, const std::vector<std::string>& values) {
  create_parent_groups(file, path);
  Handle type = utf8_vlen_string_type();
  const hsize_t n = values.size();
  Handle space(H5Screate_simple(1, &n, nullptr));
  Handle dcpl = make_plist(H5P_DATASET_CREATE);
  Handle dataset(H5Dcreate2(file.id(), path.c_str(), type.id(), space.id(), H5P_DEFAULT, dcpl.id(), H5P_DEFAULT));
  std::vector<const char*> pointers;
  pointers.reserve(values.size());
  for (const auto& v : values) pointers.push_back(v.c_str());
  if (!dataset.valid() ||
      (n > 0 && H5Dwrite(dataset.id(), type.id(), H5S_ALL, H5S_ALL, H5P_DEFAULT, pointers.data()) < 0)) {
    fail(ErrorKind::kOutput, "{}: {}: cannot write string dataset: {}", file.path(), path, write_failure_reason());
  }
}

void make_scale(const File& file, const std::string& scale_path, const std::string& label) {
  Handle dataset(H5Dopen2(file.id(), scale_path.c_str(), H5P_DEFAULT));
  if (!dataset.valid() || H5DSset_scale(dataset.id(), label.c_str()) < 0) {
    fail(ErrorKind::kOutput, "{}: {}: cannot make a dimension scale", file.path(), scale_path);
  }
}

void attach_scale(const File& file, const std::string& dataset_path, const std::string& scale_path, unsigned dim) {
  Handle dataset(H5Dopen2(file.id(), dataset_path.c_str(), H5P_DEFAULT));
  Handle scale(H5Dopen2(file.id(), scale_path.c_str(), H5P_DEFAULT));
  if (!dataset.valid() || !scale.valid() || H5DSattach_scale(dataset.id(), scale.id(), dim) < 0) {
    fail(ErrorKind::kOutput, "{}: {}: cannot attach dimension scale {}", file.path(), dataset_path, scale_path);
  }
}

void label_dimensions(const File& file, const std::string& dataset_path, const std::vector<std::string>& labels) {
  Handle dataset(H5Dopen2(file.id(), dataset_path.c_str(), H5P_DEFAULT));
  for (unsigned i = 0; i < labels.size(); ++i) {
    if (!dataset.valid() || H5DSset_label(dataset.id(), i, labels[i].c_str()) < 0) {
      fail(ErrorKind::kOutput, "{}: {}: cannot label dimension {}", file.path(), dataset_path, i);
    }
  }
}

}  // namespace hysparse::h5
