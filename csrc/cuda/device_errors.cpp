// The record of index errors found by the CUDA setup kernels (device_errors.h): mapped pinned
// memory written by the kernels, read by the host at every ALTO CUDA op's entry and by
// check_device_errors(), with the messages that name the bad index.
#include "device_errors.h"

#include <c10/cuda/CUDAException.h>
#include <c10/util/Exception.h>
#include <cuda_runtime.h>

#include <atomic>
#include <cstdlib>
#include <mutex>
#include <sstream>
#include <string>

#include "lora_kernels.h"

namespace alto {
namespace {

struct ErrorRecord {
  int32_t* host = nullptr;
  int32_t* device = nullptr;
};

// Set once an ALTO CUDA op has allocated the record: before that no error can be pending.
std::atomic<bool> record_allocated{false};

ErrorRecord& error_record() {
  static ErrorRecord rec;
  static std::once_flag once;
  std::call_once(once, [] {
    C10_CUDA_CHECK(cudaHostAlloc(reinterpret_cast<void**>(&rec.host), 4 * sizeof(int32_t),
                                 cudaHostAllocMapped | cudaHostAllocPortable));
    for (int i = 0; i < 4; ++i) rec.host[i] = 0;
    C10_CUDA_CHECK(cudaHostGetDevicePointer(reinterpret_cast<void**>(&rec.device), rec.host, 0));
    record_allocated.store(true);
  });
  return rec;
}

std::atomic<bool>& sync_flag() {
  static std::atomic<bool> flag{[] {
    const char* env = std::getenv("ALTO_SYNC_CHECKS");
    return env != nullptr && env[0] != '\0' && env[0] != '0';
  }()};
  return flag;
}

std::string describe_error(int32_t code, int32_t g, int32_t a, int32_t b) {
  std::ostringstream m;
  m << "ALTO CUDA op: ";
  switch (code) {
    case cuda::kErrSegStart: m << "seg_indptr[0] must be 0, got " << a; break;
    case cuda::kErrRankStart: m << "rank_indptr[0] must be 0, got " << a; break;
    case cuda::kErrSegOrder:
      m << "seg_indptr must be non-decreasing, but seg_indptr[" << g << "]=" << a << " > seg_indptr["
        << g + 1 << "]=" << b;
      break;
    case cuda::kErrRankOrder:
      m << "rank_indptr must be non-decreasing, but rank_indptr[" << g << "]=" << a
        << " > rank_indptr[" << g + 1 << "]=" << b;
      break;
    case cuda::kErrSegEnd:
      m << "seg_indptr is out of range at adapter " << g << " (value " << a
        << "): it must end at the number of tokens";
      break;
    case cuda::kErrRankEnd:
      m << "rank_indptr is out of range at adapter " << g << " (value " << a
        << "): it must end at the total rank R";
      break;
    case cuda::kErrRankWidth:
      m << "adapter " << g << " has rank " << a << " (from rank_indptr) but h_width is only " << b;
      break;
    case cuda::kErrRowSlot:
      m << "alto::packed_adamw_: row_slot[" << g << "]=" << a << " is not -1 or a slot < " << b;
      break;
    case cuda::kErrSlotCall:
      m << "alto::packed_adamw_: slot_call[" << g << "]=" << a << " is not -1 or an entry < " << b;
      break;
    case cuda::kErrSlotCallTwice:
      m << "alto::packed_adamw_: slot_call[" << g << "]=" << a << " is another slot's entry too";
      break;
    default: m << "unknown index error code " << code;
  }
  m << ". Found on the GPU; adapters with bad indices were skipped by that launch.";
  return m.str();
}

}  // namespace

int32_t* device_error_record() { return error_record().device; }

void raise_recorded_device_error() {
  ErrorRecord& rec = error_record();
  volatile int32_t* h = rec.host;
  const int32_t code = h[0];
  if (code <= 0) return;  // 0: none; -1: a kernel is writing one (seen after its sync)
  const std::string msg = describe_error(code, h[1], h[2], h[3]);
  for (int i = 3; i >= 0; --i) h[i] = 0;
  TORCH_CHECK_VALUE(false, msg);
}

void check_device_errors() {
  // No ALTO CUDA op ran in this process (on a machine without a GPU none can): nothing is
  // pending, and CUDA is not touched.
  if (!record_allocated.load()) return;
  C10_CUDA_CHECK(cudaDeviceSynchronize());
  raise_recorded_device_error();
}

void set_sync_checks(bool enabled) { sync_flag().store(enabled); }
bool sync_checks() { return sync_flag().load(); }

}  // namespace alto
