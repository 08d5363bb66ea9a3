#pragma once
// Output files appear whole or not at all: write to a temporary name in the
// destination directory, then rename() over the destination.
#include <string>

namespace hysparse {

class AtomicOutput {
 public:
  explicit AtomicOutput(std::string destination);  // checks the directory is writable
  AtomicOutput(const AtomicOutput&) = delete;
  AtomicOutput& operator=(const AtomicOutput&) = delete;
  ~AtomicOutput();  // removes the temporary file unless commit() succeeded

  const std::string& temporary_path() const { return temporary_; }
  const std::string& destination() const { return destination_; }
  void commit();  // rename into place; throws Error(kOutput)

 private:
  std::string destination_, temporary_;
  bool committed_ = false;
};

}  // namespace hysparse
