// Python binding of engine::MoEEngine: imports arrays (bindings/array.h), keeps the bound LoRA
// arrays and a submitted forward's arrays alive, releases the GIL while the engine runs, and runs
// submit_forward on a background thread. Calls from several Python threads: bindings/call_guard.h.
#include <pybind11/stl.h>
#include <unistd.h>

#include <cmath>
#include <exception>
#include <memory>
#include <thread>
#include <vector>

#include "bindings/array.h"
#include "bindings/bindings.h"
#include "bindings/call_guard.h"
#include "engine/moe_engine.h"
#include "kernels/dispatch.h"

namespace kt::bindings {

namespace py = pybind11;
using engine::StateError;

namespace {

class PyEngine {
 public:
  PyEngine(int64_t num_experts, int64_t top_k, int64_t hidden_size, int64_t intermediate_size,
           int64_t lora_rank, py::object lora_alpha, const std::string& lora_layout,
           const std::string& weight_dtype, int64_t max_tokens, int64_t max_cache_depth,
           py::object num_threads, py::object isa, int64_t group_size, py::object tp,
           const std::string& activation_dtype, const std::string& backward_dtype,
           const std::string& activation_policy, const std::string& activation,
           double activation_alpha, py::object activation_limit, double activation_up_offset,
           py::object activation_gate_softcap, py::object activation_up_softcap) {
    engine::EngineConfig cfg;
    cfg.num_experts = num_experts;
    cfg.top_k = top_k;
    cfg.hidden_size = hidden_size;
    cfg.intermediate_size = intermediate_size;
    cfg.lora_rank = lora_rank;
    // None: alpha = rank (the engine's NaN); a given alpha must be a number.
    cfg.lora_alpha = std::nan("");
    if (!lora_alpha.is_none()) {
      cfg.lora_alpha = lora_alpha.cast<double>();
      if (std::isnan(cfg.lora_alpha)) {
        throw engine::ValueError("lora_alpha: expected None or a finite non-zero number, got nan");
      }
    }
    if (lora_layout != "fused" && lora_layout != "split") {
      throw engine::ValueError("lora_layout: expected 'fused' or 'split', got '" + lora_layout +
                               "'");
    }
    cfg.lora_fused = lora_layout == "fused";
    cfg.weight_dtype = weight_dtype;
    cfg.group_size = group_size;
    cfg.activation_dtype = activation_dtype;
    cfg.backward_dtype = backward_dtype;
    cfg.activation_policy = activation_policy;
    cfg.activation = activation;
    cfg.activation_alpha = activation_alpha;
    if (!activation_limit.is_none()) cfg.activation_limit = activation_limit.cast<double>();
    cfg.activation_up_offset = activation_up_offset;
    if (!activation_gate_softcap.is_none()) {
      cfg.activation_gate_softcap = activation_gate_softcap.cast<double>();
    }
    if (!activation_up_softcap.is_none()) {
      cfg.activation_up_softcap = activation_up_softcap.cast<double>();
    }
    if (tp.is_none()) {
      cfg.tp = 0;  // one slice per NUMA node
    } else {
      const int64_t n = tp.cast<int64_t>();
      if (n < 1 || n > 4096) {
        throw engine::ValueError("tp: expected None or an integer in [1, 4096], got " +
                                 std::to_string(n));
      }
      cfg.tp = static_cast<int>(n);
    }
    cfg.max_tokens = max_tokens;
    cfg.max_cache_depth = max_cache_depth;
    if (!num_threads.is_none()) {
      const int64_t n = num_threads.cast<int64_t>();
      if (n < 1 || n > 4096) {
        throw engine::ValueError("num_threads: expected None or an integer in [1, 4096], got " +
                                 std::to_string(n));
      }
      cfg.num_threads = static_cast<int>(n);
    }
    if (!isa.is_none()) {
      cfg.isa = isa.cast<std::string>();
      if (cfg.isa.empty()) {
        throw engine::ValueError("isa: expected None or one of " + kernels::isa_names_text() +
                                 ", got ''");
      }
    }
    eng_ = std::make_unique<engine::MoEEngine>(cfg);
  }

  ~PyEngine() {
    forget_forked_submit();
    if (worker_.joinable()) {
      py::gil_scoped_release nogil;
      worker_.join();
    }
  }

  // Reads of the engine's state (no work): wait for a running call instead of refusing, and read
  // under the state lock without the GIL; `f` must not touch Python objects.
  template <typename F>
  auto read(const char* what, F f) {
    forget_forked_submit();
    py::gil_scoped_release nogil;
    return state_.read([&] {
      if (!eng_) throw StateError(std::string(what) + ": the engine is closed");
      if (worker_.joinable()) {
        throw StateError(std::string(what) +
                         ": a submitted forward is pending; call sync_forward() first");
      }
      return f(*eng_);
    });
  }

  // In a process forked while a submitted forward was pending, the thread running it exists only
  // in the parent: forget its handle (a join would wait forever) and the call's arrays; the next
  // sync_forward says so. Returns whether that happened now.
  bool forget_forked_submit() {
    if (!worker_.joinable() || getpid() == submit_pid_) return false;
    auto* lost = new std::thread(std::move(worker_));  // leaked on purpose: never joinable here
    (void)lost;
    submitted_.reset();
    async_error_ = nullptr;
    forked_submit_ = true;
    return true;
  }

  engine::MoEEngine& live(const char* what) {
    forget_forked_submit();
    if (!eng_) throw StateError(std::string(what) + ": the engine is closed");
    if (worker_.joinable()) {
      throw StateError(std::string(what) +
                       ": a submitted forward is pending; call "
                       "sync_forward() first");
    }
    return *eng_;
  }

  void load_weights(py::object gate_up, py::object gate, py::object up, py::object down) {
    CallGuard guard(state_, "load_weights");
    engine::MoEEngine& e = live("load_weights");
    auto a_gu = import_array(gate_up, "gate_up");
    auto a_g = import_array(gate, "gate");
    auto a_u = import_array(up, "up");
    auto a_d = import_array(down, "down");
    if (!a_d->view.present) throw engine::TypeError("down: expected an array, got None");
    py::gil_scoped_release nogil;
    e.load_weights(a_gu->view, a_g->view, a_u->view, a_d->view);
  }

  void set_biases(py::object gate_up, py::object gate, py::object up, py::object down) {
    CallGuard guard(state_, "set_biases");
    engine::MoEEngine& e = live("set_biases");
    auto a_gu = import_array(gate_up, "gate_up");
    auto a_g = import_array(gate, "gate");
    auto a_u = import_array(up, "up");
    auto a_d = import_array(down, "down");
    py::gil_scoped_release nogil;
    e.set_biases(a_gu->view, a_g->view, a_u->view, a_d->view);
  }

  void load_quantized(py::object gate_up, py::object gate_up_scale, py::object gate,
                      py::object gate_scale, py::object up, py::object up_scale, py::object down,
                      py::object down_scale) {
    CallGuard guard(state_, "load_quantized_weights");
    engine::MoEEngine& e = live("load_quantized_weights");
    auto a_gu = import_array(gate_up, "gate_up");
    auto s_gu = import_array(gate_up_scale, "gate_up_scale");
    auto a_g = import_array(gate, "gate");
    auto s_g = import_array(gate_scale, "gate_scale");
    auto a_u = import_array(up, "up");
    auto s_u = import_array(up_scale, "up_scale");
    auto a_d = import_array(down, "down");
    auto s_d = import_array(down_scale, "down_scale");
    py::gil_scoped_release nogil;
    e.load_quantized(a_gu->view, s_gu->view, a_g->view, s_g->view, a_u->view, s_u->view, a_d->view,
                     s_d->view);
  }

  void set_lora(py::kwargs kw) {
    CallGuard guard(state_, "set_lora");
    engine::MoEEngine& e = live("set_lora");
    static const char* const kNames[] = {
        "a_gate_up",   "b_gate_up", "a_gate",         "a_up",           "b_gate",      "b_up",
        "a_down",      "b_down",    "grad_a_gate_up", "grad_b_gate_up", "grad_a_gate", "grad_a_up",
        "grad_b_gate", "grad_b_up", "grad_a_down",    "grad_b_down"};
    for (auto item : kw) {
      const std::string key = py::str(item.first);
      bool known = false;
      for (const char* n : kNames) known = known || key == n;
      if (!known) {
        throw engine::TypeError("set_lora: unexpected argument '" + key +
                                "'; expected a_gate_up, b_gate_up, a_gate, a_up, b_gate, b_up, "
                                "a_down, b_down and their grad_* arrays");
      }
    }
    std::vector<std::unique_ptr<Array>> arrays;
    engine::View* slots[16];
    engine::LoraArrays la;
    engine::View* fields[] = {&la.a_gu, &la.b_gu, &la.a_g,   &la.a_u,   &la.b_g,  &la.b_u,
                              &la.a_d,  &la.b_d,  &la.ga_gu, &la.gb_gu, &la.ga_g, &la.ga_u,
                              &la.gb_g, &la.gb_u, &la.ga_d,  &la.gb_d};
    for (int i = 0; i < 16; ++i) {
      slots[i] = fields[i];
      py::object v = kw.contains(kNames[i]) ? py::object(kw[kNames[i]]) : py::none();
      arrays.push_back(import_array(v, kNames[i]));
      *slots[i] = arrays.back()->view;
    }
    {
      py::gil_scoped_release nogil;
      e.set_lora(la);
    }
    lora_arrays_ = std::move(arrays);  // the old binding's arrays are released here (GIL held)
  }

  void lora_updated() {
    CallGuard guard(state_, "lora_updated");
    engine::MoEEngine& e = live("lora_updated");
    py::gil_scoped_release nogil;
    e.lora_updated();
  }

  struct Call {
    std::unique_ptr<Array> x, ids, w, out;
  };

  Call import_forward(py::handle x, py::handle ids, py::handle w, py::handle out) {
    Call c;
    c.x = import_array(x, "x");
    c.ids = import_array(ids, "expert_ids");
    c.w = import_array(w, "routing_weights");
    c.out = import_array(out, "out");
    return c;
  }

  void forward(py::handle x, py::handle ids, py::handle w, py::handle out, bool save) {
    CallGuard guard(state_, "forward");
    engine::MoEEngine& e = live("forward");
    Call c = import_forward(x, ids, w, out);
    py::gil_scoped_release nogil;
    e.forward(c.x->view, c.ids->view, c.w->view, c.out->view, save);
  }

  void submit_forward(py::handle x, py::handle ids, py::handle w, py::handle out, bool save) {
    CallGuard guard(state_, "submit_forward");
    engine::MoEEngine& e = live("submit_forward");
    auto c = std::make_shared<Call>(import_forward(x, ids, w, out));
    e.check_forward(c->x->view, c->ids->view, c->w->view, c->out->view, save);
    submitted_ = c;
    async_error_ = nullptr;
    forked_submit_ = false;
    submit_pid_ = getpid();
    engine::MoEEngine* eng = &e;
    worker_ = std::thread([this, eng, c, save] {
      try {
        eng->forward(c->x->view, c->ids->view, c->w->view, c->out->view, save);
      } catch (...) {
        async_error_ = std::current_exception();
      }
    });
  }

  void sync_forward() {
    CallGuard guard(state_, "sync_forward");
    if (!eng_) throw StateError("sync_forward: the engine is closed");
    forget_forked_submit();
    if (forked_submit_) {
      forked_submit_ = false;
      throw StateError(
          "sync_forward: the forward was submitted before this process was forked and ran in the "
          "parent; its output and cached activations are not in this process (call "
          "clear_cache() and submit it again)");
    }
    if (!worker_.joinable()) {
      throw StateError("sync_forward: no submitted forward is pending; call submit_forward first");
    }
    {
      py::gil_scoped_release nogil;
      worker_.join();
    }
    submitted_.reset();  // releases the call's arrays (GIL held)
    if (async_error_) {
      std::exception_ptr err = async_error_;
      async_error_ = nullptr;
      std::rethrow_exception(err);
    }
  }

  bool pending_submit() const { return worker_.joinable() && getpid() == submit_pid_; }

  void backward(py::handle dout, py::handle dx, py::handle dw, py::object x) {
    CallGuard guard(state_, "backward");
    engine::MoEEngine& e = live("backward");
    auto a = import_array(dout, "grad_out");
    auto b = import_array(dx, "grad_input");
    auto c = import_array(dw, "grad_routing_weights");
    auto d = import_array(x, "x");
    py::gil_scoped_release nogil;
    e.backward(a->view, b->view, c->view, d->view);
  }

  void clear_cache() {
    CallGuard guard(state_, "clear_cache");
    live("clear_cache").clear_cache();
  }
  int64_t cache_depth() {
    return read("cache_depth", [](engine::MoEEngine& e) { return e.cache_depth(); });
  }

  py::dict memory_stats() {
    const engine::MemoryStats m =
        read("memory_stats", [](engine::MoEEngine& e) { return e.memory_stats(); });
    py::dict d;
    d["weight_bytes"] = m.weight_bytes;
    d["lora_bytes"] = m.lora_bytes;
    d["cache_bytes"] = m.cache_bytes;
    d["cache_peak_bytes"] = m.cache_peak_bytes;
    d["scratch_bytes"] = m.scratch_bytes;
    return d;
  }

  py::dict last_timings() {
    py::dict d;
    const auto timings =
        read("last_timings", [](engine::MoEEngine& e) { return e.last_timings(); });
    for (const auto& [k, v] : timings) d[py::str(k)] = v;
    return d;
  }

  py::dict profile_stats() {
    py::dict d;
    const auto stats =
        read("profile_stats", [](engine::MoEEngine& e) { return e.profile_stats(); });
    for (const auto& [k, v] : stats) {
      d[py::str(k)] = py::make_tuple(v.calls, v.total_ms);
    }
    return d;
  }

  void reset_profile() {
    CallGuard guard(state_, "reset_profile");
    live("reset_profile").reset_profile();
  }

  // Waits for a call running on another thread and for a submitted forward, then frees the
  // engine; later calls raise StateError.
  void close() {
    forget_forked_submit();
    {
      py::gil_scoped_release nogil;
      state_.close_and_wait();
      if (worker_.joinable()) worker_.join();
    }
    submitted_.reset();
    async_error_ = nullptr;
    std::unique_ptr<engine::MoEEngine> doomed = std::move(eng_);  // readers now see "closed"
    {
      py::gil_scoped_release nogil;
      doomed.reset();
    }
    lora_arrays_.clear();
  }

  bool closed() const { return !eng_; }
  const engine::MoEEngine& get(const char* what) const {
    if (!eng_) throw StateError(std::string(what) + ": the engine is closed");
    return *eng_;
  }

 private:
  std::unique_ptr<engine::MoEEngine> eng_;
  std::vector<std::unique_ptr<Array>> lora_arrays_;
  std::thread worker_;
  pid_t submit_pid_ = 0;        // the process that started worker_
  bool forked_submit_ = false;  // a submitted forward was lost to a fork (see forget_forked_submit)
  std::shared_ptr<Call> submitted_;
  std::exception_ptr async_error_;
  CallState state_;
};

}  // namespace

void register_engine(py::module_& m) {
  py::class_<PyEngine>(m, "MoEEngine")
      .def(py::init<int64_t, int64_t, int64_t, int64_t, int64_t, py::object, const std::string&,
                    const std::string&, int64_t, int64_t, py::object, py::object, int64_t,
                    py::object, const std::string&, const std::string&, const std::string&,
                    const std::string&, double, py::object, double, py::object, py::object>(),
           py::arg("num_experts"), py::arg("top_k"), py::arg("hidden_size"),
           py::arg("intermediate_size"), py::kw_only(), py::arg("lora_rank") = 0,
           py::arg("lora_alpha") = py::none(), py::arg("lora_layout") = "fused",
           py::arg("weight_dtype") = "bf16", py::arg("max_tokens") = 4096,
           py::arg("max_cache_depth") = 1, py::arg("num_threads") = py::none(),
           py::arg("isa") = py::none(), py::arg("group_size") = 128, py::arg("tp") = 1,
           py::arg("activation_dtype") = "bf16", py::arg("backward_dtype") = "bf16",
           py::arg("activation_policy") = "retain", py::arg("activation") = "silu",
           py::arg("activation_alpha") = 1.0, py::arg("activation_limit") = py::none(),
           py::arg("activation_up_offset") = 0.0, py::arg("activation_gate_softcap") = py::none(),
           py::arg("activation_up_softcap") = py::none())
      .def("set_biases", &PyEngine::set_biases, py::kw_only(), py::arg("gate_up") = py::none(),
           py::arg("gate") = py::none(), py::arg("up") = py::none(), py::arg("down") = py::none())
      .def("load_weights", &PyEngine::load_weights, py::kw_only(), py::arg("gate_up") = py::none(),
           py::arg("gate") = py::none(), py::arg("up") = py::none(), py::arg("down") = py::none())
      .def("load_quantized_weights", &PyEngine::load_quantized, py::kw_only(),
           py::arg("gate_up") = py::none(), py::arg("gate_up_scale") = py::none(),
           py::arg("gate") = py::none(), py::arg("gate_scale") = py::none(),
           py::arg("up") = py::none(), py::arg("up_scale") = py::none(),
           py::arg("down") = py::none(), py::arg("down_scale") = py::none())
      .def("set_lora", &PyEngine::set_lora)
      .def("lora_updated", &PyEngine::lora_updated)
      .def("forward", &PyEngine::forward, py::arg("x"), py::arg("expert_ids"),
           py::arg("routing_weights"), py::arg("out"), py::arg("save_for_backward") = true)
      .def("submit_forward", &PyEngine::submit_forward, py::arg("x"), py::arg("expert_ids"),
           py::arg("routing_weights"), py::arg("out"), py::arg("save_for_backward") = true)
      .def("sync_forward", &PyEngine::sync_forward)
      .def("backward", &PyEngine::backward, py::arg("grad_out"), py::arg("grad_input"),
           py::arg("grad_routing_weights"), py::arg("x") = py::none())
      .def("clear_cache", &PyEngine::clear_cache)
      .def_property_readonly("cache_depth", &PyEngine::cache_depth)
      .def_property_readonly("pending_submit", &PyEngine::pending_submit)
      .def("memory_stats", &PyEngine::memory_stats)
      .def("last_timings", &PyEngine::last_timings)
      .def("profile_stats", &PyEngine::profile_stats)
      .def("reset_profile", &PyEngine::reset_profile)
      .def_property_readonly("engine_id", [](const PyEngine& p) { return p.get("engine_id").id(); })
      .def("close", &PyEngine::close)
      .def_property_readonly("closed", &PyEngine::closed)
      .def_property_readonly(
          "isa",
          [](const PyEngine& p) { return std::string(kernels::isa_name(p.get("isa").isa())); })
      .def_property_readonly("num_threads",
                             [](const PyEngine& p) { return p.get("num_threads").num_threads(); })
      .def_property_readonly("scaling",
                             [](const PyEngine& p) { return p.get("scaling").scaling(); })
      .def_property_readonly("lora_set",
                             [](const PyEngine& p) { return p.get("lora_set").lora_set(); })
      .def_property_readonly("tp", [](const PyEngine& p) { return p.get("tp").tp(); })
      .def_property_readonly(
          "pinned_threads",
          [](const PyEngine& p) { return p.get("pinned_threads").pinned_threads(); })
      .def_property_readonly(
          "weight_dtype",
          [](const PyEngine& p) { return p.get("weight_dtype").config().weight_dtype; })
      .def_property_readonly(
          "activation_dtype",
          [](const PyEngine& p) { return p.get("activation_dtype").config().activation_dtype; })
      .def_property_readonly(
          "backward_dtype",
          [](const PyEngine& p) { return p.get("backward_dtype").config().backward_dtype; })
      .def_property(
          "activation_policy",
          [](const PyEngine& p) { return p.get("activation_policy").activation_policy(); },
          [](PyEngine& p, const std::string& policy) {
            p.live("activation_policy").set_activation_policy(policy);
          })
      .def_property_readonly(
          "activation",
          [](const PyEngine& p) {
            const engine::activation::Spec& a = p.get("activation").activation();
            py::dict d;
            d["name"] = engine::activation::name(a.kind);
            d["alpha"] = a.alpha;
            d["limit"] = std::isinf(a.limit) ? py::object(py::none()) : py::float_(a.limit);
            d["up_offset"] = a.up_offset;
            d["gate_softcap"] =
                std::isinf(a.gate_cap) ? py::object(py::none()) : py::float_(a.gate_cap);
            d["up_softcap"] = std::isinf(a.up_cap) ? py::object(py::none()) : py::float_(a.up_cap);
            return d;
          })
      .def_property_readonly("has_biases",
                             [](const PyEngine& p) {
                               const engine::MoEEngine& e = p.get("has_biases");
                               return py::make_tuple(e.has_gate_up_bias(), e.has_down_bias());
                             })
      .def_property_readonly("weights_loaded", [](const PyEngine& p) {
        return p.get("weights_loaded").weights_loaded();
      });
}

}  // namespace kt::bindings
