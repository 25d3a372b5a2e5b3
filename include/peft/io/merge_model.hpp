#pragma once
/// \file merge_model.hpp
/// \brief A PEFT adapter directory merged into a safetensors model for deployment, exactly as Hugging
/// Face PEFT's `merge_and_unload()` (what the `peft-merge` program runs). Needs nlohmann-json (CMake
/// target `peft::io`); no training code.
///
/// - Merges LoRA (`W + s·B A`, s = α/r or α/√r with rsLoRA, per module with rank and alpha patterns, times
///   the user's scale) and DoRA (`m / ‖W + sBA‖ ⊙ (W + sBA)` per output unit), transposed for
///   fan_in_fan_out (merge.hpp). F32 and F64 weights are merged in their own precision; F16 and BF16
///   weights in float32 and rounded back to their dtype once, as PyTorch's in-place add of a float32
///   delta does.
/// - Every other tensor is copied bit for bit and the metadata kept; `modules_to_save` tensors replace
///   the base's (their shape may differ).
/// - A sharded base (`model.safetensors.index.json`) gives sharded output, the same shard names, beside
///   the output index; one shard is mapped at a time.
/// - Everything is checked before anything is written (every module has its base tensor, of a shape
///   and dtype that fit). The shards are written into a staging directory beside the output and renamed
///   into place once all are complete: an error leaves no output file behind, and an input is never
///   written (an output that is an input is refused).

#include "peft/core/error.hpp"
#include "peft/io/merge.hpp"
#include "peft/io/peft_adapter.hpp"
#include "peft/io/safetensors.hpp"

#include <nlohmann/json.hpp>

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <map>
#include <ostream>
#include <sstream>
#include <string>
#include <vector>

#include <unistd.h>

namespace peft {
namespace io {

/// \brief What merge_model() merges and where it writes.
struct MergeOptions {
  std::string base;     ///< model.safetensors, or model.safetensors.index.json
  std::string adapter;  ///< the PEFT adapter directory
  std::string out;      ///< merged.safetensors, or OUTDIR/model.safetensors.index.json for a sharded base
  double scale = 1.0;   ///< multiplies every module's s
};

/// \brief What merge_model() did.
struct MergeSummary {
  std::size_t merged = 0, replaced = 0, kept = 0;
  std::uint64_t bytes = 0;  ///< the output's tensor bytes
};

namespace merge_detail {

namespace fs = std::filesystem;

inline bool ends_with(const std::string& s, const std::string& tail) {
  return s.size() >= tail.size() && s.compare(s.size() - tail.size(), tail.size(), tail) == 0;
}

/// What happens to one base tensor.
struct Plan {
  const PeftModule<double>* module = nullptr;  // merged with this module
  const TensorInfo* replacement = nullptr;                // or replaced by this adapter tensor
};

inline const char* kind(const PeftModule<double>& m) { return m.magnitude.size() ? "DoRA" : "LoRA"; }

template <class S>
using RowMajorX = Eigen::Matrix<S, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

/// Buffers kept from one weight to the next.
template <class S>
struct Work {
  RowMajorX<S> W, before;
  MatrixX<S> A, B;
  VectorX<S> m;
};

/// Merges one weight, held in S (float for F32, F16, BF16; double for F64), and streams it to `out` in
/// blocks of stored rows (each row holds whole output units, or whole input units with
/// fan_in_fan_out), so only a block is in memory; DoRA with fan_in_fan_out, whose norms run over stored
/// columns, takes the whole tensor. \returns the largest |element| of the update s B A (LoRA), or the
/// largest change of an element (DoRA).
template <class S>
double merge_into(const SafetensorsView& shard, const TensorInfo& t, const PeftModule<double>& m, double scale,
                  bool fan_in_fan_out, SafetensorsWriter& out, Work<S>& w) {
  const Index rows = shard.matrix_shape(t).first;
  const double s = m.scale * scale;
  const bool dora = m.magnitude.size() != 0;
  w.A = m.A.cast<S>();
  w.B = m.B.cast<S>();
  w.m = m.magnitude.cast<S>();
  const Index block = (dora && fan_in_fan_out) ? std::max<Index>(rows, 1) : Index(256);
  double change = 0;
  for (Index i0 = 0; i0 < rows; i0 += block) {
    const Index n = std::min(block, rows - i0);
    shard.read_rows<S>(t, i0, n, w.W);
    if (dora) {
      w.before = w.W;
      if (fan_in_fan_out)
        peft::merge::dora(w.W, w.A, w.B, w.m, s, true);
      else
        peft::merge::dora(w.W, w.A, w.B.middleRows(i0, n), w.m.segment(i0, n), s);
      if (w.W.size() > 0) change = std::max(change, double((w.W - w.before).cwiseAbs().maxCoeff()));
    } else if (fan_in_fan_out) {  // stored rows i0.. are input units i0..
      peft::merge::lora(w.W, w.A.middleCols(i0, n), w.B, s, true, &change);
    } else {
      peft::merge::lora(w.W, w.A, w.B.middleRows(i0, n), s, false, &change);
    }
    out.append(w.W);
  }
  return change;
}

}  // namespace merge_detail

/// \brief Merges the PEFT adapter directory `o.adapter` into the safetensors model `o.base` (a file, or
/// a `.index.json` of shards), writing `o.out`; see the file comment. Reports each tensor merged or
/// replaced on `report`, and progress on `progress`.
/// \throws FileError, FormatError, ShapeError, ConfigError or NumericalError; then nothing is written.
inline MergeSummary merge_model(const MergeOptions& o, std::ostream& report, std::ostream& progress) {
  namespace fs = std::filesystem;
  using namespace merge_detail;
  const PeftAdapter<double> adapter(o.adapter);
  if (adapter.config().peft_type != "LORA")
    throw FormatError("peft::io::merge_model: " + o.adapter + " holds a " + adapter.config().peft_type +
                      " adapter; peft-merge merges LoRA and DoRA (merge SSF in memory: peft::io::load_peft, then merge())");
  const PeftConfig& cfg = adapter.config();

  // The base: one file, or shards listed in an index (in the order they first appear).
  const bool sharded = ends_with(o.base, ".index.json");
  if (sharded != ends_with(o.out, ".index.json"))
    throw ConfigError("peft::io::merge_model: a sharded base (" + o.base + ") needs --out OUTDIR/<name>.index.json, " +
                            "a single file a single --out file");
  std::vector<std::string> shard_names;
  nlohmann::ordered_json index;
  const fs::path base_dir = fs::path(o.base).parent_path();
  if (sharded) {
    ShardIndex shards = read_shard_index(o.base);
    index = std::move(shards.index);
    shard_names = std::move(shards.shards);
  } else {
    shard_names.push_back(fs::path(o.base).filename().string());
  }
  const fs::path out_dir = fs::path(o.out).parent_path().empty() ? fs::path(".") : fs::path(o.out).parent_path();
  if (!fs::is_directory(out_dir)) throw FileError("peft::io::merge_model: no directory " + out_dir.string());
  const auto input_path = [&](const std::string& shard) {
    return sharded ? (base_dir / shard).string() : o.base;
  };
  const auto output_path = [&](const std::string& shard) { return sharded ? (out_dir / shard).string() : o.out; };
  for (const auto& shard : shard_names) {
    std::error_code ec;
    if (fs::exists(output_path(shard)) && fs::equivalent(input_path(shard), output_path(shard), ec))
      throw ConfigError("peft::io::merge_model: the output " + output_path(shard) + " is the input; write elsewhere");
  }

  // Everything is checked before anything is written: every module and saved tensor has its base
  // tensor, of a shape and dtype that fit.
  std::map<std::string, std::string> where;  // base tensor -> shard
  for (const auto& shard : shard_names) {
    const SafetensorsFile f(input_path(shard));
    for (const TensorInfo& t : f.view().tensors()) where[t.name] = shard;
  }
  std::map<std::string, Plan> plan;  // base tensor -> what to do
  for (const auto& m : adapter.modules()) {
    const std::string name = m.path + ".weight";
    const auto it = where.find(name);
    if (it == where.end())
      throw FormatError("peft::io::merge_model: the base has no tensor \"" + name + "\" for the adapter's module \"" +
                              m.path + "\"");
    const SafetensorsFile f(input_path(it->second));
    const TensorInfo& t = f.view().at(name);
    if (!is_float_dtype(t.dtype) || t.shape.size() != 2)
      throw FormatError("peft::io::merge_model: base tensor \"" + name + "\" is " + dtype_name(t.dtype) +
                              " with " + std::to_string(t.shape.size()) + " dimensions, not a 2-D floating weight");
    const std::uint64_t d_out = std::uint64_t(m.B.rows()), d_in = std::uint64_t(m.A.cols());
    const std::uint64_t want_rows = cfg.fan_in_fan_out ? d_in : d_out, want_cols = cfg.fan_in_fan_out ? d_out : d_in;
    if (t.shape[0] != want_rows || t.shape[1] != want_cols)
      throw ShapeError("peft::io::merge_model: base tensor \"" + name + "\" is " + std::to_string(t.shape[0]) + "x" +
                             std::to_string(t.shape[1]) + ", but the adapter's factors need " +
                             std::to_string(want_rows) + "x" + std::to_string(want_cols));
    plan[name].module = &m;
  }
  for (const auto& s : adapter.saved_tensors()) {
    if (where.find(s.base_name) == where.end())
      throw FormatError("peft::io::merge_model: the adapter's modules_to_save tensor \"" + s.file_key +
                              "\" has no counterpart \"" + s.base_name + "\" in the base");
    if (plan[s.base_name].module)
      throw FormatError("peft::io::merge_model: \"" + s.base_name + "\" is both adapted and in modules_to_save");
    plan[s.base_name].replacement = &adapter.file().at(s.file_key);
  }

  // Write each shard into a staging directory beside the output; rename them all into place at the end.
  const fs::path staging = out_dir / (".peft-merge-" + std::to_string(::getpid()));
  fs::create_directory(staging);
  struct Cleanup {
    fs::path dir;
    ~Cleanup() {
      std::error_code ec;
      fs::remove_all(dir, ec);
    }
  } cleanup{staging};

  std::size_t merged = 0, kept = 0, replaced = 0, done = 0;
  Work<float> work_f;  // buffers reused from one weight to the next
  Work<double> work_d;
  std::uint64_t total_bytes = 0;
  for (const auto& shard : shard_names) {
    const SafetensorsFile in(input_path(shard));
    const auto& view = in.view();
    std::vector<TensorSpec> specs;
    for (const TensorInfo& t : view.tensors()) {
      const auto p = plan.find(t.name);
      const TensorInfo& src = (p != plan.end() && p->second.replacement) ? *p->second.replacement : t;
      specs.push_back({t.name, src.dtype, src.shape});
      total_bytes += src.end - src.begin;
    }
    SafetensorsWriter out((staging / fs::path(output_path(shard)).filename()).string(), specs,
                                    view.metadata());
    for (const TensorInfo& t : view.tensors()) {
      const auto p = plan.find(t.name);
      if (p != plan.end() && p->second.module) {
        in.populate(t);
        const auto& m = *p->second.module;
        const double change = t.dtype == Dtype::F64
                                  ? merge_into<double>(view, t, m, o.scale, cfg.fan_in_fan_out, out, work_d)
                                  : merge_into<float>(view, t, m, o.scale, cfg.fan_in_fan_out, out, work_f);
        report << "merged   " << t.name << " (" << dtype_name(t.dtype) << " " << t.shape[0] << "x"
                  << t.shape[1] << ", " << kind(m) << " r=" << m.A.rows() << " s=" << m.scale * o.scale
                  << "): largest " << (m.magnitude.size() ? "change " : "update |s B A| ") << change << "\n";
        ++merged;
      } else if (p != plan.end() && p->second.replacement) {
        const TensorInfo& r = *p->second.replacement;
        out.write_bytes(adapter.file().bytes(r), std::size_t(r.end - r.begin));
        report << "replaced " << t.name << " by the adapter's " << r.name << " (modules_to_save)\n";
        ++replaced;
      } else {
        out.copy_from(in.fd(), in.offset(t), view.bytes(t), std::size_t(t.end - t.begin));
        ++kept;
      }
      if (++done % 64 == 0) progress << "peft-merge: " << done << " tensors written\n";
    }
    out.commit();
    progress << "peft-merge: " << shard << " done\n";
  }

  // All shards are complete: move them into place, then the index.
  for (const auto& shard : shard_names)
    fs::rename(staging / fs::path(output_path(shard)).filename(), output_path(shard));
  if (sharded) {
    if (index.contains("metadata") && index["metadata"].is_object()) index["metadata"]["total_size"] = total_bytes;
    const std::string tmp = (staging / "index.json").string();
    {
      std::ofstream f(tmp, std::ios::binary);
      f << index.dump(2) << "\n";
      if (!f.flush()) throw FileError("peft::io::merge_model: cannot write " + tmp);
    }
    fs::rename(tmp, o.out);
  }
  report << merged << " tensors merged, " << replaced << " replaced (modules_to_save), " << kept
         << " copied bit for bit; wrote " << o.out << "\n";
  return {merged, replaced, kept, total_bytes};
}


}  // namespace io
}  // namespace peft
