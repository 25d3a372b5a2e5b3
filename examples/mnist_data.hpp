#pragma once
// Reading (Fashion-)MNIST's gzip'd IDX files with zlib, for examples/fashion_mnist.cpp.
//
// IDX: a big-endian header (magic 0x00000803 for images, with count, rows, cols; 0x00000801 for labels,
// with count), then one unsigned byte per pixel or label. Images come out as a 784 x N float matrix, one
// column per image, pixels scaled to [0, 1] (the column-major layout the adapters take).
//
// Built without zlib (PEFT_DEMO_HAVE_ZLIB undefined), read_idx() fails with a message saying so.

#include <Eigen/Core>

#include <algorithm>
#include <cstdint>
#include <string>
#include <vector>

#ifdef PEFT_DEMO_HAVE_ZLIB
#include <zlib.h>
#endif

namespace demo {

/// Images (784 x N, values in [0, 1]) and their labels (N entries).
struct LabeledImages {
  Eigen::MatrixXf X;
  std::vector<int> labels;
};

namespace detail {

#ifdef PEFT_DEMO_HAVE_ZLIB
/// Reads a whole gzip'd file into `bytes`. \returns false with a reason in `error`.
inline bool gunzip_file(const std::string& path, std::vector<unsigned char>& bytes, std::string& error) {
  gzFile file = gzopen(path.c_str(), "rb");
  if (file == nullptr) {
    error = path + ": cannot open";
    return false;
  }
  gzbuffer(file, 1u << 17);
  bytes.clear();
  unsigned char chunk[1 << 16];
  for (;;) {
    const int got = gzread(file, chunk, sizeof chunk);
    if (got < 0) {
      int code = 0;
      error = path + ": " + gzerror(file, &code);
      gzclose(file);
      return false;
    }
    if (got == 0) break;
    bytes.insert(bytes.end(), chunk, chunk + got);
  }
  gzclose(file);
  return true;
}
#endif

inline std::uint32_t big_endian_u32(const std::vector<unsigned char>& bytes, std::size_t at) {
  return (std::uint32_t(bytes[at]) << 24) | (std::uint32_t(bytes[at + 1]) << 16) | (std::uint32_t(bytes[at + 2]) << 8) |
         std::uint32_t(bytes[at + 3]);
}

}  // namespace detail

/// Reads an IDX image file and its label file (both gzip'd), keeping the first `max_images` images at
/// most. \returns false, with a one-line reason in `error`, if either is missing or malformed, or if
/// the two disagree on the count.
inline bool read_idx(const std::string& images_path, const std::string& labels_path, LabeledImages& out,
                     std::string& error, Eigen::Index max_images = Eigen::Index(1) << 40) {
#ifdef PEFT_DEMO_HAVE_ZLIB
  std::vector<unsigned char> img, lab;
  if (!detail::gunzip_file(images_path, img, error) || !detail::gunzip_file(labels_path, lab, error)) return false;
  if (img.size() < 16 || detail::big_endian_u32(img, 0) != 0x00000803u) {
    error = images_path + ": not an IDX image file";
    return false;
  }
  if (lab.size() < 8 || detail::big_endian_u32(lab, 0) != 0x00000801u) {
    error = labels_path + ": not an IDX label file";
    return false;
  }
  const std::size_t count = detail::big_endian_u32(img, 4);
  const std::size_t pixels = std::size_t(detail::big_endian_u32(img, 8)) * detail::big_endian_u32(img, 12);
  if (pixels != 784 || img.size() != 16 + count * pixels) {
    error = images_path + ": expected 28 x 28 images and " + std::to_string(16 + count * pixels) + " bytes";
    return false;
  }
  if (detail::big_endian_u32(lab, 4) != count || lab.size() != 8 + count) {
    error = labels_path + ": " + std::to_string(detail::big_endian_u32(lab, 4)) + " labels for " +
            std::to_string(count) + " images";
    return false;
  }
  const Eigen::Index n = std::min(static_cast<Eigen::Index>(count), max_images);
  out.X = Eigen::Map<const Eigen::Matrix<unsigned char, Eigen::Dynamic, Eigen::Dynamic>>(img.data() + 16, 784, n)
              .cast<float>() /
          255.0f;
  out.labels.assign(lab.begin() + 8, lab.begin() + 8 + n);
  return true;
#else
  (void)images_path;
  (void)labels_path;
  (void)out;
  (void)max_images;
  error = "this build has no zlib (install zlib1g-dev and reconfigure) to read the gzip'd IDX files";
  return false;
#endif
}

}  // namespace demo
