#pragma once
// Small file helpers the file-format tests share: a file's bytes read whole and written whole, a
// directory's files with their bytes, and the leftovers a save may leave beside its destination.
#include "support/catch.hpp"

#include <cstddef>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <map>
#include <string>
#include <vector>

namespace peft::test {

/// \returns the bytes of the file at `path`, as a std::string or a std::vector<unsigned char>; fails the
/// test if it cannot be opened.
template <class Container = std::string>
Container read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  REQUIRE(in.good());
  return Container((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
}

/// Writes `bytes` as the whole file at `path`, replacing what was there; fails the test if it cannot be
/// written.
inline void write_file(const std::string& path, const char* data, std::size_t size) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(data, std::streamsize(size));
  REQUIRE(out.good());
}
inline void write_file(const std::string& path, const std::string& bytes) {
  write_file(path, bytes.data(), bytes.size());
}
inline void write_file(const std::string& path, const std::vector<unsigned char>& bytes) {
  write_file(path, reinterpret_cast<const char*>(bytes.data()), bytes.size());
}

/// Every regular file of a directory, by name, with its bytes.
inline std::map<std::string, std::string> directory_bytes(const std::string& dir) {
  std::map<std::string, std::string> out;
  for (const auto& e : std::filesystem::directory_iterator(dir))
    out[e.path().filename().string()] = read_file(e.path().string());
  return out;
}

/// The names in a directory that look like a save's leftovers (a temporary or a moved-aside old one).
inline std::vector<std::string> leftovers(const std::filesystem::path& parent) {
  std::vector<std::string> out;
  for (const auto& e : std::filesystem::directory_iterator(parent)) {
    const std::string name = e.path().filename().string();
    if (name.find(".tmp-") != std::string::npos || name.find(".old-") != std::string::npos) out.push_back(name);
  }
  return out;
}

}  // namespace peft::test
