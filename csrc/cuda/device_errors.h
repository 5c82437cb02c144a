// Index errors found by the CUDA setup kernels, reported without a device sync: the record lives
// in mapped pinned memory, every ALTO CUDA op checks it on entry, and check_device_errors()
// synchronizes first so nothing is missed.
#pragma once
#include <cstdint>

namespace alto {

// Device pointer of the 4-int error record (allocated on first use).
int32_t* device_error_record();
// Raises ValueError (and clears the record) if a kernel recorded an index error.
void raise_recorded_device_error();
// Synchronizes all devices' work, then raise_recorded_device_error().
void check_device_errors();
// When on, every ALTO CUDA op synchronizes after its launch and raises at once.
void set_sync_checks(bool enabled);
bool sync_checks();

}  // namespace alto
