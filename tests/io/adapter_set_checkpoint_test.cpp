// Training checkpoints of a whole model's adapters (io/adapter_set_io.hpp: save_checkpoint,
// load_checkpoint): a run of LoRA or DoRA with dropout, in float and double, resumed from a checkpoint
// is the uninterrupted run bit for bit (the parameters, the optimizer's moments and step counts, each
// parameter's own step count, the learning rate, the dropout streams), the training state read from its
// bytes by the tests' own safetensors reader (support/safetensors_reader.hpp); and a damaged or foreign
// training state, or one of another precision, is refused with nothing changed. PEFT directories have
// their own test (adapter_set_io_test.cpp).
#include "support/catch.hpp"
#include "support/errors.hpp"
#include "support/matrices.hpp"
#include "support/safetensors_reader.hpp"
#include "support/scratch.hpp"
#include "support/training_run.hpp"

#include <peft/io/adapter_set_io.hpp>
#include <peft/optim/adamw.hpp>
#include <peft/optim/sgd.hpp>

#include <nlohmann/json.hpp>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <functional>
#include <set>
#include <string>
#include <vector>

namespace fs = std::filesystem;
namespace io = peft::io;
using Eigen::MatrixXd;
using Eigen::MatrixXf;
using peft::AdapterKind;
using peft::test::decode;
using peft::test::has_substring;
using peft::test::message_of;
using peft::test::RawSafetensors;
using peft::test::read_safetensors;
using peft::test::same_bits;
using peft::test::Scratch;
using peft::test::write_raw_safetensors;
using namespace peft::test::training_run;

namespace {

/// Whether two optimizer states are the same, slot by slot in order, bit for bit (the learning rate too).
template <class S>
bool same_state(const peft::OptimizerState<S>& a, const peft::OptimizerState<S>& b) {
  if (a.optimizer != b.optimizer || a.buffer_names != b.buffer_names || a.step_count != b.step_count ||
      std::memcmp(&a.lr, &b.lr, sizeof a.lr) != 0 || a.slots.size() != b.slots.size())
    return false;
  for (std::size_t i = 0; i < a.slots.size(); ++i) {
    const auto &x = a.slots[i], &y = b.slots[i];
    if (x.name != y.name || x.rows != y.rows || x.cols != y.cols || x.steps != y.steps ||
        x.buffers.size() != y.buffers.size())
      return false;
    for (std::size_t k = 0; k < x.buffers.size(); ++k)
      if (!same_bits(x.buffers[k], y.buffers[k])) return false;
  }
  return true;
}

/// The random streams' states of a set's adapters, in order.
template <class M>
std::vector<std::string> random_states(const peft::AdapterSet<M>& set) {
  std::vector<std::string> out;
  for (const auto& l : set.layers()) out.push_back(l.adapter.random_state());
  return out;
}

}  // namespace

// ---------------------------------------------------------------------------------------------------
// 1. Checkpoints resume bit for bit

namespace {

template <class M>
struct Run {
  Model<M> model;
  peft::AdapterSet<M> set;
  peft::AdamW<typename M::Scalar> opt;
  explicit Run(AdapterKind kind)
      : set(model.weights, make_config(kind, 0.25)), opt(make_adamw<typename M::Scalar>()) {
    set.train_whole("head");
    set.add_to(opt);
  }
};

/// N = 6 steps uninterrupted, against 3 steps, a checkpoint, a new run built the same way restored from
/// it and 3 more steps: every parameter the same bits. The checkpoint's files are checked from their
/// bytes; without the random streams restored, the result differs.
template <class M>
void check_resume(AdapterKind kind, const std::string& dir) {
  using S = typename M::Scalar;
  Run<M> whole(kind);
  train(whole.set, whole.opt, 0, 6);
  const auto want = snapshot(whole.set);

  Params<S> at3;
  peft::OptimizerState<S> state3;
  std::vector<std::string> streams3;
  {
    Run<M> first(kind);
    train(first.set, first.opt, 0, 3);
    io::save_checkpoint(first.set, first.opt, dir, {{"step", "3"}, {"epoch", "0"}});
    at3 = snapshot(first.set);
    state3 = first.opt.state_dict();
    streams3 = random_states(first.set);
  }

  // The training state, from its bytes.
  const RawSafetensors ts = read_safetensors(dir + "/training_state.safetensors");
  const std::string dt = io::dtype_name(io::dtype_of<S>());
  REQUIRE(ts.metadata.at("format") == "peft-training-state");
  REQUIRE(ts.metadata.at("optimizer") == "peft::AdamW");
  REQUIRE(ts.metadata.at("step_count") == "3");
  REQUIRE(std::strtod(ts.metadata.at("lr").get<std::string>().c_str(), nullptr) == schedule(3));
  REQUIRE(ts.metadata.at("user.step") == "3");
  REQUIRE(ts.metadata.at("user.epoch") == "0");
  std::set<std::string> expected_keys;
  for (const auto& [name, v] : at3) {
    INFO(name);
    REQUIRE(ts.metadata.at("steps." + name) == "3");
    for (const std::string& key : {name, "optimizer.exp_avg." + name, "optimizer.exp_avg_sq." + name}) {
      expected_keys.insert(key);
      REQUIRE((ts.tensors.count(key) == 1));
      REQUIRE((ts.tensors.at(key).dtype == dt));
      REQUIRE((ts.tensors.at(key).shape == std::vector<std::uint64_t>{std::uint64_t(v.rows()), std::uint64_t(v.cols())}));
    }
    REQUIRE((decode(ts.tensors.at(name)) == v.template cast<double>()));
  }
  std::set<std::string> keys;
  for (const auto& [key, raw] : ts.tensors) keys.insert(key);
  REQUIRE((keys == expected_keys));
  for (const auto& slot : state3.slots)
    REQUIRE(decode(ts.tensors.at("optimizer.exp_avg_sq." + slot.name)).reshaped() ==
            slot.buffers[1].template cast<double>());
  for (const std::string path : {"layers.0.q_proj", "layers.0.v_proj", "layers.1.q_proj"})
    REQUIRE(ts.metadata.contains("rng." + path));
  // The PEFT files beside it are a deployable adapter.
  {
    Model<M> fresh;
    auto deployed = io::load_peft(dir, fresh.weights);
    REQUIRE((deployed.size() == 3));
  }

  // Resumed: a new run, built the same way, restored, continued.
  Run<M> resumed(kind);
  REQUIRE_FALSE(same_params(snapshot(resumed.set), at3));
  const io::Metadata user = io::load_checkpoint(resumed.set, resumed.opt, dir);
  REQUIRE(user == io::Metadata{{"epoch", "0"}, {"step", "3"}});
  // What was restored (CHECK: the end-to-end comparison below runs whatever these say).
  CHECK(same_params(snapshot(resumed.set), at3));
  CHECK(same_state(resumed.opt.state_dict(), state3));
  CHECK((random_states(resumed.set) == streams3));
  train(resumed.set, resumed.opt, 3, 6);
  const auto got = snapshot(resumed.set);
  REQUIRE((got.size() == want.size()));
  for (const auto& [name, v] : want) {
    INFO(name);
    REQUIRE(same_bits(got.at(name), v));
  }
  REQUIRE(same_state(resumed.opt.state_dict(), whole.opt.state_dict()));

  // The control: restored but with the new run's own random streams, the dropout masks differ.
  Run<M> control(kind);
  const auto fresh_streams = random_states(control.set);
  io::load_checkpoint(control.set, control.opt, dir);
  for (std::size_t i = 0; i < control.set.size(); ++i)
    control.set.layers()[i].adapter.set_random_state(fresh_streams[i]);
  train(control.set, control.opt, 3, 6);
  REQUIRE_FALSE(same_params(snapshot(control.set), want));
}

}  // namespace

TEST_CASE("a float lora run resumed from a checkpoint is the uninterrupted run bit for bit", "[io][checkpoint]") {
  Scratch scratch("resume_lora");
  check_resume<MatrixXf>(AdapterKind::lora, scratch / "ckpt");
}

TEST_CASE("a float dora run resumed from a checkpoint is the uninterrupted run bit for bit", "[io][checkpoint]") {
  Scratch scratch("resume_dora");
  check_resume<MatrixXf>(AdapterKind::dora, scratch / "ckpt");
}

TEST_CASE("a double lora run resumed from a checkpoint is the uninterrupted run bit for bit", "[io][checkpoint]") {
  Scratch scratch("resume_double");
  check_resume<MatrixXd>(AdapterKind::lora, scratch / "ckpt");
}

namespace {

/// A run whose head is trained whole from step `head_from` on, registered in the optimizer only then:
/// the head's parameters have received fewer updates than the adapters' when the run is checkpointed.
struct LateHeadRun {
  Model<MatrixXf> model;
  peft::AdapterSet<MatrixXf> set{model.weights, make_config(AdapterKind::lora)};
  peft::AdamW<float> opt = make_adamw<float>();
  LateHeadRun() { set.add_to(opt); }
  void add_head() {
    set.train_whole("head");
    std::vector<peft::Parameter<float>> head;
    for (const auto& p : set.parameters())
      if (std::string(p.name).rfind("head.", 0) == 0) head.push_back(p);
    REQUIRE((head.size() == 2));
    opt.add_parameters(head, peft::ParamOptions(), "the head");
  }
};

}  // namespace

TEST_CASE("a parameter registered later resumes with its own step count, not the optimizer's", "[io][checkpoint]") {
  // AdamW's bias correction divides by 1 - beta^t with t the parameter's own update count: the head,
  // registered after 2 of the 3 steps, has t = 1 at the checkpoint while the adapters have t = 3.
  Scratch scratch("late_head");
  LateHeadRun whole;
  train(whole.set, whole.opt, 0, 2);
  whole.add_head();
  train(whole.set, whole.opt, 2, 6);
  const auto want = snapshot(whole.set);

  {
    LateHeadRun first;
    train(first.set, first.opt, 0, 2);
    first.add_head();
    train(first.set, first.opt, 2, 3);
    io::save_checkpoint(first.set, first.opt, scratch / "ckpt");
  }
  const RawSafetensors ts = read_safetensors(scratch / "ckpt/training_state.safetensors");
  REQUIRE(ts.metadata.at("step_count") == "3");
  REQUIRE(ts.metadata.at("steps.layers.0.q_proj.lora_A") == "3");
  REQUIRE(ts.metadata.at("steps.head.weight") == "1");
  REQUIRE(ts.metadata.at("steps.head.bias") == "1");

  LateHeadRun resumed;
  resumed.add_head();
  io::load_checkpoint(resumed.set, resumed.opt, scratch / "ckpt");
  for (const auto& slot : resumed.opt.state_dict().slots) {
    INFO(slot.name);
    REQUIRE(slot.steps == (slot.name.rfind("head.", 0) == 0 ? 1 : 3));
  }
  train(resumed.set, resumed.opt, 3, 6);
  const auto got = snapshot(resumed.set);
  for (const auto& [name, v] : want) {
    INFO(name);
    REQUIRE(same_bits(got.at(name), v));
  }
}

// ---------------------------------------------------------------------------------------------------
// 2. Refused checkpoints

namespace {

/// A copy of the checkpoint `from` in `to`, with its training state changed by `edit`.
void corrupt(const std::string& from, const std::string& to, const std::function<void(RawSafetensors&)>& edit) {
  fs::remove_all(to);
  fs::create_directories(to);
  for (const char* name : {"adapter_config.json", "adapter_model.safetensors"})
    fs::copy_file(from + "/" + name, to + "/" + name);
  RawSafetensors f = read_safetensors(from + "/training_state.safetensors");
  edit(f);
  write_raw_safetensors(to + "/training_state.safetensors", f);
}

}  // namespace

TEST_CASE("load_checkpoint refuses a damaged or foreign training state and changes nothing",
          "[io][checkpoint][errors]") {
  Scratch scratch("bad_checkpoint");
  Run<MatrixXf> run(AdapterKind::lora);
  train(run.set, run.opt, 0, 2);
  const std::string good = scratch / "good";
  io::save_checkpoint(run.set, run.opt, good);
  train(run.set, run.opt, 2, 3);  // now the set differs from the checkpoint: a partial restore would show

  const auto params = snapshot(run.set);
  const auto state = run.opt.state_dict();
  const auto streams = random_states(run.set);
  const auto unchanged = [&] {
    REQUIRE(same_params(snapshot(run.set), params));
    REQUIRE(same_state(run.opt.state_dict(), state));
    REQUIRE((random_states(run.set) == streams));
  };
  const std::string bad = scratch / "bad";
  const auto refused = [&](const std::function<void(RawSafetensors&)>& edit, auto error, const std::string& what) {
    using Error = decltype(error);
    corrupt(good, bad, edit);
    REQUIRE_THROWS_AS(io::load_checkpoint(run.set, run.opt, bad), Error);
    REQUIRE_THAT(message_of([&] { io::load_checkpoint(run.set, run.opt, bad); }), has_substring(what));
    unchanged();
  };

  SECTION("the good one restores") {
    corrupt(good, bad, [](RawSafetensors&) {});
    io::load_checkpoint(run.set, run.opt, bad);
    REQUIRE_FALSE(same_params(snapshot(run.set), params));
    REQUIRE((run.opt.step_count() == 2));
  }
  SECTION("a parameter missing") {
    refused([](RawSafetensors& f) { f.tensors.erase("layers.1.q_proj.lora_B"); }, peft::FormatError(""),
            "layers.1.q_proj.lora_B");
  }
  SECTION("an optimizer buffer missing") {
    refused([](RawSafetensors& f) { f.tensors.erase("optimizer.exp_avg_sq.head.bias"); }, peft::FormatError(""),
            "optimizer.exp_avg_sq.head.bias");
  }
  SECTION("a parameter of another shape") {
    refused(
        [](RawSafetensors& f) {
          auto& shape = f.tensors.at("layers.0.q_proj.lora_A").shape;
          std::swap(shape[0], shape[1]);
        },
        peft::FormatError(""), "layers.0.q_proj.lora_A");
  }
  SECTION("another optimizer") {
    refused([](RawSafetensors& f) { f.metadata["optimizer"] = "peft::SGD"; }, peft::FormatError(""), "peft::SGD");
  }
  SECTION("not a training state") {
    refused([](RawSafetensors& f) { f.metadata["format"] = "pt"; }, peft::FormatError(""), "training state");
  }
  SECTION("a slot's step count that is not a number") {
    refused([](RawSafetensors& f) { f.metadata["steps.head.bias"] = "two"; }, peft::FormatError(""), "steps.head.bias");
  }
  SECTION("a random stream that is not one") {
    refused([](RawSafetensors& f) { f.metadata["rng.layers.1.q_proj"] = "garbage"; }, peft::FormatError(""),
            "rng.layers.1.q_proj");
  }
  SECTION("a random stream missing") {
    refused([](RawSafetensors& f) { f.metadata.erase("rng.layers.1.q_proj"); }, peft::FormatError(""), "rng.layers.1.q_proj");
  }
  SECTION("a negative step count the optimizer refuses") {
    refused([](RawSafetensors& f) { f.metadata["step_count"] = "-1"; }, peft::ConfigError(""), "step_count");
  }
  SECTION("a negative learning rate the optimizer refuses") {
    refused([](RawSafetensors& f) { f.metadata["lr"] = "-0.5"; }, peft::ConfigError(""), "lr");
  }
  SECTION("no training state at all") {
    REQUIRE_THROWS_AS(io::load_checkpoint(run.set, run.opt, scratch.dir.string()), peft::FileError);
    unchanged();
  }
  SECTION("a checkpoint of SGD") {
    peft::SGD<float> sgd;
    Model<MatrixXf> m2;
    peft::AdapterSet<MatrixXf> set2(m2.weights, make_config(AdapterKind::lora, 0.25));
    set2.train_whole("head");
    set2.add_to(sgd);
    train(set2, sgd, 0, 1);
    io::save_checkpoint(set2, sgd, bad);
    REQUIRE_THROWS_AS(io::load_checkpoint(run.set, run.opt, bad), peft::FormatError);
    unchanged();
  }
}

TEST_CASE("a float checkpoint does not load into a double set", "[io][checkpoint][errors]") {
  Scratch scratch("precision");
  Run<MatrixXf> f(AdapterKind::lora);
  train(f.set, f.opt, 0, 2);
  const std::string dir = scratch / "ckpt";
  io::save_checkpoint(f.set, f.opt, dir);

  Run<MatrixXd> d(AdapterKind::lora);
  train(d.set, d.opt, 0, 1);
  const auto params = snapshot(d.set);
  const auto state = d.opt.state_dict();
  REQUIRE_THROWS_AS(io::load_checkpoint(d.set, d.opt, dir), peft::FormatError);
  REQUIRE_THAT(message_of([&] { io::load_checkpoint(d.set, d.opt, dir); }), has_substring("F32"));
  REQUIRE(same_params(snapshot(d.set), params));
  REQUIRE(same_state(d.opt.state_dict(), state));
}
