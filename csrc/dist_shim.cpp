// C ABI over PyTorch's c10d (TCPStore, PrefixStore, ProcessGroupGloo and, when built with
// VOLTTRAIN_NCCL, ProcessGroupNCCL) for VoltTrain's `dist` module (src/dist/ffi.rs).
//
// Rules every function here keeps:
// - No C++ exception crosses the FFI: each entry point catches everything and returns an error
//   code plus a heap string (`*err`, freed with `vt_dist_free_str`) holding the C++ message.
// - Tensors arrive as `at::Tensor*`, the `tensor` type of torch-sys's C API (`torch_api.h`:
//   `typedef torch::Tensor *tensor;`), i.e. what tch's `Tensor::as_ptr` gives.
// - Only torch's own libraries are linked; gloo's headers (Debian's libgloo-dev) are used for
//   parsing only: torch's Gloo classes hold gloo types behind shared_ptr.

#include <torch/csrc/distributed/c10d/PrefixStore.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>
#ifdef VOLTTRAIN_NCCL
#include <torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp>
#endif

#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <string>
#include <vector>

namespace {

struct VtPg {
  c10::intrusive_ptr<c10d::Store> store;
  c10::intrusive_ptr<c10d::Backend> backend;
  int rank;
  int world;
};

char* dup_str(const std::string& s) {
  char* out = static_cast<char*>(std::malloc(s.size() + 1));
  if (out != nullptr) {
    std::memcpy(out, s.data(), s.size());
    out[s.size()] = '\0';
  }
  return out;
}

void set_err(char** err, const std::string& msg) {
  if (err != nullptr) {
    *err = dup_str(msg);
  }
}

// Runs `f`, turning every exception into an error string. Returns 0 on success, -1 on error.
template <typename F>
int guarded(char** err, const char* what, F&& f) {
  try {
    f();
    return 0;
  } catch (const c10::Error& e) {
    set_err(err, std::string(what) + ": " + e.what_without_backtrace());
  } catch (const std::exception& e) {
    set_err(err, std::string(what) + ": " + e.what());
  } catch (...) {
    set_err(err, std::string(what) + ": unknown C++ exception");
  }
  return -1;
}

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

std::shared_ptr<::gloo::transport::Device> gloo_device(const char* iface, const char* host) {
  if (iface != nullptr && iface[0] != '\0') {
    return c10d::ProcessGroupGloo::createDeviceForInterface(iface);
  }
  if (host != nullptr && host[0] != '\0') {
    return c10d::ProcessGroupGloo::createDeviceForHostname(host);
  }
  return c10d::ProcessGroupGloo::createDefaultDevice();
}

}  // namespace

extern "C" {

typedef struct VtPg vt_pg;

void vt_dist_free_str(char* s) { std::free(s); }

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
      auto gopts = c10d::ProcessGroupGloo::Options::create(timeout);
      gopts->devices.push_back(gloo_device(iface, host));
      if (gloo_threads > 0) {
        gopts->threads = gloo_threads;
      }
      pg = c10::make_intrusive<c10d::ProcessGroupGloo>(store, rank, world, gopts);
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

}  // extern "C"
