#pragma once
// Thin RAII layer over the HDF5 C API. Every failure becomes a hysparse::Error
// naming the file and object; HDF5's own error stack printing is silenced.
#include <hdf5.h>

#include <cstdint>
#include <optional>
#include <string>
#include <utility>
#include <vector>

namespace hysparse::h5 {

// Owns one hid_t and closes it with the matching H5?close.
class Handle {
 public:
  Handle() = default;
  explicit Handle(hid_t id) : id_(id) {}
  Handle(const Handle&) = delete;
  Handle& operator=(const Handle&) = delete;
  Handle(Handle&& other) noexcept : id_(std::exchange(other.id_, H5I_INVALID_HID)) {}
  Handle& operator=(Handle&& other) noexcept {
    if (this != &other) {
      reset();
      id_ = std::exchange(other.id_, H5I_INVALID_HID);
    }
    return *this;
  }
  ~Handle() { reset(); }
  hid_t id() const { return id_; }
  bool valid() const { return id_ >= 0; }
  void reset();
  // Gives up ownership without closing: the id stays open in libhdf5.
  hid_t release() { return std::exchange(id_, H5I_INVALID_HID); }

 private:
  hid_t id_ = H5I_INVALID_HID;
};

void silence_hdf5_errors();

// Files (and their objects) libhdf5 still holds open. After a failed write or close (a full disk)
// libhdf5 1.10 may keep a half-closed file whose cleanup at exit crashes; main() then exits without it.
std::int64_t open_hdf5_objects();

enum class ElementType { kFloat32, kFloat16, kBFloat16, kFloat64, kInt32, kInt64, kUInt16, kOther };
const char* to_string(ElementType type);

// A file plus the path used to name it in error messages.
class File {
 public:
  static File open_read(const std::string& path);
  static File create(const std::string& path);  // truncates
  File() = default;
  File(File&&) noexcept = default;
  File& operator=(File&&) noexcept = default;
  // A file opened for reading is closed. A file created for writing and never close()d (an exception
  // is unwinding) is abandoned unflushed: its temporary file is about to be removed, and libhdf5 1.10
  // crashes (SIGSEGV in H5F__close) closing a file whose writes failed, e.g. on a full disk.
  ~File();
  const std::string& path() const { return path_; }
  hid_t id() const { return handle_.id(); }
  void flush();  // Error(kOutput) naming the file and the system's reason (disk full, file too large)
  // Flushes, then closes. On failure the file is abandoned as above and Error(kOutput) is thrown.
  void close();

 private:
  Handle handle_;
  std::string path_;
  bool writable_ = false;
};

bool link_exists(hid_t loc, const std::string& path);  // each component checked, no error stack
bool is_group(hid_t loc, const std::string& path);
bool is_dataset(hid_t loc, const std::string& path);
Handle open_group(const File& file, const std::string& path);
Handle create_group(const File& file, const std::string& path);  // creates parents
std::vector<std::string> list_children(const File& file, const std::string& group);

// ---- attributes (on the object at `object_path`, "/" for the root) ----
bool has_attribute(const File& file, const std::string& object_path, const std::string& name);
std::string read_string_attribute(const File& file, const std::string& object_path, const std::string& name);
std::vector<std::string> read_string_list_attribute(const File& file, const std::string& object_path,
                                                    const std::string& name);
std::int64_t read_int_attribute(const File& file, const std::string& object_path, const std::string& name);
double read_double_attribute(const File& file, const std::string& object_path, const std::string& name);
std::vector<std::int64_t> read_int_list_attribute(const File& file, const std::string& object_path,
                                                  const std::string& name);

void write_attribute(const File& file, const std::string& object_path, const std::string& name,
                     const std::string& value);
void write_attribute(const File& file, const std::string& object_path, const std::string& name,
                     const char* value);
void write_attribute(const File& file, const std::string& object_path, const std::string& name,
                     std::int64_t value);
void write_attribute(const File& file, const std::string& object_path, const std::string& name, double value);
void write_attribute(const File& file, const std::string& object_path, const std::string& name,
                     const std::vector<std::string>& values);
void write_attribute(const File& file, const std::string& object_path, const std::string& name,
                     const std::vector<std::int64_t>& values);
void write_attribute(const File& file, const std::string& object_path, const std::string& name,
                     const std::vector<double>& values);

// ---- datasets ----
struct DatasetInfo {
  std::vector<std::uint64_t> dims;
  ElementType element_type = ElementType::kOther;  // bfloat16 when uint16 + dtype="bfloat16"
  std::string type_description;                    // for error messages
  std::string where;                               // "FILE: /path", names the dataset in errors
  std::uint64_t element_count() const;             // throws on overflow
};
DatasetInfo dataset_info(const File& file, const std::string& path);

// Reads a hyperslab [offset, offset+count) (full extent when offset is empty) as float32,
// converting float16/bfloat16/float64. The output must hold the product of counts.
void read_floats(const File& file, const std::string& path, const DatasetInfo& info, float* out,
                 const std::vector<std::uint64_t>& offset = {}, const std::vector<std::uint64_t>& count = {});
std::vector<std::int64_t> read_ints(const File& file, const std::string& path);
std::vector<double> read_doubles(const File& file, const std::string& path);
std::string read_string_dataset(const File& file, const std::string& path);

struct WriteOptions {
  std::vector<std::uint64_t> chunk;  // empty: contiguous
  int gzip_level = 0;                // 0: no compression (needs chunk)
  bool shuffle = false;
};

// Writes in memory-order; `element_type` picks the file type (float16/bfloat16
// convert from the float32 input; bfloat16 is stored as uint16 + dtype attribute).
void write_floats(const File& file, const std::string& path, const std::vector<std::uint64_t>& dims,
                  const float* data, ElementType element_type = ElementType::kFloat32,
                  const WriteOptions& options = {});
void write_doubles(const File& file, const std::string& path, const std::vector<std::uint64_t>& dims,
                   const double* data, const WriteOptions& options = {});
void write_ints(const File& file, const std::string& path, const std::vector<std::uint64_t>& dims,
                const std::int64_t* data, const WriteOptions& options = {});
void write_int32s(const File& file, const std::string& path, const std::vector<std::uint64_t>& dims,
                  const std::int32_t* data, const WriteOptions& options = {});
void write_string_dataset(const File& file, const std::string& path, const std::string& value);
// A 1-D dataset of variable-length UTF-8 strings (a table column of names).
void write_strings(const File& file, const std::string& path, const std::vector<std::string>& values);

// HDF5 dimension scales: `scale_path` becomes a scale named `label`, attached to
// dimension `dim` of `dataset_path`.
void make_scale(const File& file, const std::string& scale_path, const std::string& label);
void attach_scale(const File& file, const std::string& dataset_path, const std::string& scale_path,
                  unsigned dim);
void label_dimensions(const File& file, const std::string& dataset_path, const std::vector<std::string>& labels);

}  // namespace hysparse::h5
