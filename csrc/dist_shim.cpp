// C ABI over PyTorch's c10d (TCPStore, PrefixStore, and, when built with VOLTTRAIN_GLOO,
// ProcessGroupGloo, when built with VOLTTRAIN_NCCL, ProcessGroupNCCL) for VoltTrain's `dist`
// module (Rust declarations in src/ffi/dist.rs). build.rs compiles it apart from the kernel
// library: only this file needs gloo's or NCCL's headers, and each backend is compiled only
// when its headers are found (a backend left out fails at run time, saying why).
//
// Rules every function here keeps:
// - No C++ exception crosses the FFI: each entry point catches everything and returns an error
//   code plus a heap string (`*err`, freed with `vt_free_str`) holding the C++ message.
// - Tensors arrive as `at::Tensor*`, the `tensor` type of torch-sys's C API (`torch_api.h`:
//   `typedef torch::Tensor *tensor;`), i.e. what tch's `Tensor::as_ptr` gives.
// - Only torch's own libraries are linked; gloo's headers (Debian's libgloo-dev) are used for
//   parsing only: torch's Gloo classes hold gloo types behind shared_ptr.

#include <torch/csrc/distributed/c10d/Backend.hpp>
#include <torch/csrc/distributed/c10d/PrefixStore.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/utils/lambda_post_hook.h>
#include <torch/csrc/autograd/variable.h>

#include "shim_common.h"
#ifdef VOLTTRAIN_GLOO
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#endif
#ifdef VOLTTRAIN_NCCL
#include <torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp>
#endif

#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

namespace {

struct VtPg {
  c10::intrusive_ptr<c10d::Store> store;
  c10::intrusive_ptr<c10d::Backend> backend;
  int rank;
  int world;
};

using vt_shim::guarded;

std::vector<at::Tensor> collect(at::Tensor** tensors, size_t n) {
  std::vector<at::Tensor> out;
  out.reserve(n);
  for (size_t i = 0; i < n; ++i) {
    if (tensors[i] == nullptr || !tensors[i]->defined()) {
      throw std::invalid_argument("tensor " + std::to_string(i) + " is undefined");
    }
    out.push_back(*tensors[i]);
  }
  return out;
}

void wait_all(std::vector<c10::intrusive_ptr<c10d::Work>>& works) {
  // Wait for every work item even when one fails, so none is left running on freed tensors;
  // then report the first failure.
  std::exception_ptr first;
  for (auto& w : works) {
    try {
      w->wait();
    } catch (...) {
      if (!first) {
        first = std::current_exception();
      }
    }
  }
  if (first) {
    std::rethrow_exception(first);
  }
}

#ifdef VOLTTRAIN_GLOO
std::shared_ptr<::gloo::transport::Device> gloo_device(const char* iface, const char* host) {
  if (iface != nullptr && iface[0] != '\0') {
    return c10d::ProcessGroupGloo::createDeviceForInterface(iface);
  }
  if (host != nullptr && host[0] != '\0') {
    return c10d::ProcessGroupGloo::createDeviceForHostname(host);
  }
  return c10d::ProcessGroupGloo::createDefaultDevice();
}
#endif

// Gradient all-reduce overlapped with backward, in the manner of DDP's Reducer: a post hook on
// each parameter's AccumulateGrad node marks the parameter ready; when every parameter of a
// bucket is ready, and every earlier bucket has been launched (so all ranks issue the
// collectives in the same order), the bucket's gradients are packed into one flat tensor and
// its all-reduce starts on Gloo's threads while autograd goes on. `finish` launches what is
// left (parameters that got no gradient contribute zeros), waits, divides by the world size and
// writes the means back into the gradients.
struct VtOverlap {
  c10::intrusive_ptr<c10d::Backend> backend;
  int world = 1;
  std::vector<at::Tensor> params;
  std::vector<std::shared_ptr<torch::autograd::Node>> accumulators;
  std::vector<uintptr_t> hook_keys;
  std::vector<int> bucket_of;
  std::vector<std::vector<int>> buckets;

  std::mutex mu;
  bool enabled = true;
  std::vector<char> ready;
  std::vector<int> pending;
  std::vector<at::Tensor> flat;
  std::vector<c10::intrusive_ptr<c10d::Work>> works;
  size_t next_launch = 0;
  std::string error;

  void reset_step() {
    std::fill(ready.begin(), ready.end(), 0);
    for (size_t b = 0; b < buckets.size(); ++b) {
      pending[b] = static_cast<int>(buckets[b].size());
      flat[b] = at::Tensor();
      works[b].reset();
    }
    next_launch = 0;
  }

  // Caller holds `mu`.
  void launch(size_t b) {
    at::NoGradGuard no_grad;
    std::vector<at::Tensor> parts;
    parts.reserve(buckets[b].size());
    for (int i : buckets[b]) {
      const at::Tensor& p = params[i];
      at::Tensor g = p.grad();
      if (g.defined()) {
        parts.push_back(g.detach().reshape({-1}));
      } else {
        parts.push_back(at::zeros({p.numel()}, p.options().requires_grad(false)));
      }
    }
    flat[b] = at::cat(parts, 0);
    std::vector<at::Tensor> one{flat[b]};
    c10d::AllreduceOptions opts;
    opts.reduceOp = c10d::ReduceOp::SUM;
    works[b] = backend->allreduce(one, opts);
  }

  // Caller holds `mu`. Launches every bucket that is complete and next in order.
  void launch_ready() {
    while (next_launch < buckets.size() && pending[next_launch] == 0) {
      launch(next_launch);
      ++next_launch;
    }
  }

  void on_ready(int i) {
    std::lock_guard<std::mutex> lock(mu);
    if (!enabled || !error.empty() || ready[i]) {
      return;
    }
    try {
      ready[i] = 1;
      pending[bucket_of[i]] -= 1;
      launch_ready();
    } catch (const c10::Error& e) {
      error = e.what_without_backtrace();
    } catch (const std::exception& e) {
      error = e.what();
    } catch (...) {
      error = "unknown C++ exception in the gradient hook";
    }
  }

  void finish() {
    std::lock_guard<std::mutex> lock(mu);
    std::exception_ptr first;
    try {
      if (!error.empty()) {
        throw std::runtime_error("while backward ran: " + error);
      }
      while (next_launch < buckets.size()) {
        launch(next_launch);
        ++next_launch;
      }
    } catch (...) {
      first = std::current_exception();
    }
    // Wait for everything launched, even after a failure, before touching the buffers.
    for (size_t b = 0; b < next_launch; ++b) {
      if (!works[b]) {
        continue;
      }
      try {
        works[b]->wait();
      } catch (...) {
        if (!first) {
          first = std::current_exception();
        }
      }
    }
    if (!first) {
      try {
        at::NoGradGuard no_grad;
        for (size_t b = 0; b < buckets.size(); ++b) {
          flat[b].div_(static_cast<double>(world));
          int64_t off = 0;
          for (int i : buckets[b]) {
            at::Tensor& p = params[i];
            const int64_t n = p.numel();
            at::Tensor mean = flat[b].narrow(0, off, n).view(p.sizes());
            at::Tensor g = p.grad();
            if (g.defined()) {
              g.copy_(mean);
            } else {
              p.mutable_grad() = mean.clone();
            }
            off += n;
          }
        }
      } catch (...) {
        first = std::current_exception();
      }
    }
    error.clear();
    reset_step();
    if (first) {
      std::rethrow_exception(first);
    }
  }

  ~VtOverlap() {
    for (size_t i = 0; i < accumulators.size(); ++i) {
      try {
        accumulators[i]->del_post_hook(hook_keys[i]);
      } catch (...) {
      }
    }
  }
};

}  // namespace

extern "C" {

typedef struct VtPg vt_pg;

int vt_dist_has_gloo() {
#ifdef VOLTTRAIN_GLOO
  return 1;
#else
  return 0;
#endif
}

int vt_dist_has_nccl() {
#ifdef VOLTTRAIN_NCCL
  return 1;
#else
  return 0;
#endif
}

// Creates the TCP store (rank 0 serves on `master_addr:port`), then a process group.
// backend: 0 = gloo, 1 = nccl. `iface`/`host` pick Gloo's network device (interface name, or a
// hostname/address to bind); both empty uses Gloo's default device. `prefix` namespaces the
// store keys. Returns NULL and sets `*err` on failure.
vt_pg* vt_dist_pg_new(int backend, const char* master_addr, uint16_t port, int rank, int world,
                      int64_t timeout_ms, const char* iface, const char* host, const char* prefix,
                      int gloo_threads, char** err) {
  vt_pg* out = nullptr;
  guarded(err, "creating the process group", [&] {
    if (master_addr == nullptr) {
      throw std::invalid_argument("master_addr is null");
    }
    if (world < 1 || rank < 0 || rank >= world) {
      throw std::invalid_argument("rank " + std::to_string(rank) + " is outside world size " +
                                  std::to_string(world));
    }
    const auto timeout = std::chrono::milliseconds(timeout_ms);
    c10d::TCPStoreOptions opts;
    opts.port = port;
    opts.isServer = rank == 0;
    opts.numWorkers = static_cast<std::size_t>(world);
    opts.waitWorkers = true;
    opts.timeout = timeout;
    auto tcp = c10::make_intrusive<c10d::TCPStore>(std::string(master_addr), opts);
    c10::intrusive_ptr<c10d::Store> store = c10::make_intrusive<c10d::PrefixStore>(
        std::string(prefix != nullptr ? prefix : "volttrain"), tcp);

    c10::intrusive_ptr<c10d::Backend> pg;
    if (backend == 0) {
#ifdef VOLTTRAIN_GLOO
      auto gopts = c10d::ProcessGroupGloo::Options::create(timeout);
      gopts->devices.push_back(gloo_device(iface, host));
      if (gloo_threads > 0) {
        gopts->threads = gloo_threads;
      }
      pg = c10::make_intrusive<c10d::ProcessGroupGloo>(store, rank, world, gopts);
#else
      (void)iface;
      (void)host;
      (void)gloo_threads;
      throw std::runtime_error(
          "this build of VoltTrain has no Gloo support: gloo's headers (gloo/config.h) were not "
          "found when it was compiled (see build.rs); install libgloo-dev (tools/provision.sh "
          "does it) or set VOLTTRAIN_GLOO_INCLUDE, and rebuild");
#endif
    } else if (backend == 1) {
#ifdef VOLTTRAIN_NCCL
      auto nopts = c10d::ProcessGroupNCCL::Options::create();
      nopts->timeout = timeout;
      pg = c10::make_intrusive<c10d::ProcessGroupNCCL>(store, rank, world, nopts);
#else
      throw std::runtime_error(
          "this build of VoltTrain has no NCCL support: it was compiled without nccl.h and the "
          "CUDA host headers (see build.rs); use backend gloo");
#endif
    } else {
      throw std::invalid_argument("unknown backend code " + std::to_string(backend));
    }
    out = new VtPg{tcp, pg, rank, world};
  });
  return out;
}

// Shuts the backend down and frees it. Never fails; errors during shutdown are swallowed
// (the caller is dropping the group).
void vt_dist_pg_free(vt_pg* pg) {
  if (pg == nullptr) {
    return;
  }
  try {
    pg->backend->shutdown();
  } catch (...) {
  }
  try {
    delete pg;
  } catch (...) {
  }
}

// In-place sum all-reduce of each tensor (one collective per tensor, all issued before waiting).
int vt_dist_all_reduce_sum(vt_pg* pg, at::Tensor** tensors, size_t n, char** err) {
  return guarded(err, "all_reduce", [&] {
    auto ts = collect(tensors, n);
    std::vector<c10::intrusive_ptr<c10d::Work>> works;
    works.reserve(ts.size());
    c10d::AllreduceOptions opts;
    opts.reduceOp = c10d::ReduceOp::SUM;
    for (auto& t : ts) {
      std::vector<at::Tensor> one{t};
      works.push_back(pg->backend->allreduce(one, opts));
    }
    wait_all(works);
  });
}

// In-place broadcast of each tensor from `root`.
int vt_dist_broadcast(vt_pg* pg, at::Tensor** tensors, size_t n, int root, char** err) {
  return guarded(err, "broadcast", [&] {
    if (root < 0 || root >= pg->world) {
      throw std::invalid_argument("root rank " + std::to_string(root) +
                                  " is outside world size " + std::to_string(pg->world));
    }
    auto ts = collect(tensors, n);
    std::vector<c10::intrusive_ptr<c10d::Work>> works;
    works.reserve(ts.size());
    c10d::BroadcastOptions opts;
    opts.rootRank = root;
    opts.rootTensor = 0;
    for (auto& t : ts) {
      std::vector<at::Tensor> one{t};
      works.push_back(pg->backend->broadcast(one, opts));
    }
    wait_all(works);
  });
}

int vt_dist_barrier(vt_pg* pg, char** err) {
  return guarded(err, "barrier", [&] {
    auto w = pg->backend->barrier(c10d::BarrierOptions());
    w->wait();
  });
}

// Sets `param.grad = grad` (tch has no setter). `grad` must match the parameter's shape.
int vt_dist_set_grad(at::Tensor* param, at::Tensor* grad, char** err) {
  return guarded(err, "set_grad", [&] {
    if (param == nullptr || grad == nullptr || !param->defined() || !grad->defined()) {
      throw std::invalid_argument("undefined tensor");
    }
    param->mutable_grad() = *grad;
  });
}

typedef struct VtOverlap vt_overlap;

// Registers the overlap hooks on `n` parameters; `bucket_of[i]` is parameter i's bucket, buckets
// numbered 0.. in launch order, each bucket one dtype and device. Returns NULL on error.
vt_overlap* vt_dist_overlap_new(vt_pg* pg, at::Tensor** params, const int* bucket_of, size_t n,
                                char** err) {
  vt_overlap* out = nullptr;
  guarded(err, "GradSync overlap set-up", [&] {
    auto ov = std::make_unique<VtOverlap>();
    ov->backend = pg->backend;
    ov->world = pg->world;
    auto ts = collect(params, n);
    int nb = 0;
    for (size_t i = 0; i < n; ++i) {
      if (!ts[i].requires_grad() || !ts[i].is_leaf()) {
        throw std::invalid_argument("parameter " + std::to_string(i) +
                                    " is not a leaf tensor that requires grad");
      }
      if (bucket_of[i] < 0) {
        throw std::invalid_argument("negative bucket index");
      }
      nb = std::max(nb, bucket_of[i] + 1);
    }
    ov->params = ts;
    ov->bucket_of.assign(bucket_of, bucket_of + n);
    ov->buckets.resize(nb);
    for (size_t i = 0; i < n; ++i) {
      ov->buckets[bucket_of[i]].push_back(static_cast<int>(i));
    }
    for (int b = 0; b < nb; ++b) {
      if (ov->buckets[b].empty()) {
        throw std::invalid_argument("bucket " + std::to_string(b) + " is empty");
      }
    }
    ov->ready.assign(n, 0);
    ov->pending.assign(nb, 0);
    ov->flat.resize(nb);
    ov->works.resize(nb);
    ov->reset_step();
    VtOverlap* raw = ov.get();
    for (size_t i = 0; i < n; ++i) {
      auto acc = torch::autograd::impl::grad_accumulator(ov->params[i]);
      if (!acc) {
        throw std::runtime_error("parameter " + std::to_string(i) + " has no grad accumulator");
      }
      const int idx = static_cast<int>(i);
      auto key = acc->add_post_hook(std::make_unique<torch::autograd::utils::LambdaPostHook>(
          [raw, idx](const torch::autograd::variable_list& outputs,
                     const torch::autograd::variable_list&) {
            raw->on_ready(idx);
            return outputs;
          }));
      // Keep the accumulator alive: the variable holds it only weakly, and a new one would
      // not carry the hook.
      ov->accumulators.push_back(std::move(acc));
      ov->hook_keys.push_back(key);
    }
    out = ov.release();
  });
  return out;
}

// Turns the hooks on or off (off = DDP's no_sync: gradients accumulate locally and `finish`
// reduces everything at once).
void vt_dist_overlap_set_enabled(vt_overlap* ov, int enabled) {
  std::lock_guard<std::mutex> lock(ov->mu);
  ov->enabled = enabled != 0;
}

// Completes the step: launches what is left, waits, averages, writes the gradients back.
int vt_dist_overlap_finish(vt_overlap* ov, char** err) {
  return guarded(err, "GradSync (overlapped) all_reduce", [&] { ov->finish(); });
}

// Number of buckets launched during backward in the step in progress (for tests).
int vt_dist_overlap_launched(vt_overlap* ov) {
  std::lock_guard<std::mutex> lock(ov->mu);
  return static_cast<int>(ov->next_launch);
}

void vt_dist_overlap_free(vt_overlap* ov) {
  if (ov == nullptr) {
    return;
  }
  try {
    {
      std::lock_guard<std::mutex> lock(ov->mu);
      for (auto& w : ov->works) {
        if (w) {
          try {
            w->wait();
          } catch (...) {
          }
        }
      }
    }
    delete ov;
  } catch (...) {
  }
}

}  // extern "C"
