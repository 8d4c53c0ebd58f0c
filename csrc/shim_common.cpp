// The one C ABI function every shim shares: freeing the error strings of shim_common.h.
//
// Compiled into the kernel library (build.rs), which every build has; the dist shim's strings
// are freed here too (both sides use std::malloc / std::free).

#include <cstdlib>

extern "C" {

// Frees an error string set by `vt_shim::set_err` (null is a no-op).
void vt_free_str(char* s) { std::free(s); }

}  // extern "C"
