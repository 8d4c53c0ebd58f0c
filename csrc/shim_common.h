// Error handling shared by VoltTrain's C++ shims: the kernel library (fused.cpp, amp.cpp,
// qlinear.cpp, ssm.cpp) and the dist shim (dist_shim.cpp). Their Rust side is src/ffi/.
//
// No C++ exception may cross the C ABI: every entry point runs its body through `guarded`,
// which returns 0 on success and -1 on error, with a malloc'd message in `*err` (freed by the
// Rust side through `vt_free_str`, shim_common.cpp).

#pragma once

#include <c10/util/Exception.h>

#include <cstdlib>
#include <cstring>
#include <exception>
#include <string>

namespace vt_shim {

inline char* dup_str(const std::string& s) {
  char* out = static_cast<char*>(std::malloc(s.size() + 1));
  if (out != nullptr) {
    std::memcpy(out, s.data(), s.size());
    out[s.size()] = '\0';
  }
  return out;
}

inline void set_err(char** err, const std::string& msg) {
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

}  // namespace vt_shim
