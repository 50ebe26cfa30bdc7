// The LoRA weights in the kernels' fp32 layout, kept for the engines that ran most recently.
// Layers run one at a time (under the engine lock), so the copies need not all live at once: an
// engine converts its bound LoRA arrays into the stage when it runs and its copy is gone or stale.
// Copies are kept, least recently used evicted first, while they fit in a byte budget
// (KT_LORA_STAGE_MIB, default 128 MiB; the running engine's copy is always kept). A small model
// converts once per optimizer step as before; a 48-layer giant model holds a few layers' copies
// instead of 48, for one conversion per layer call (E * r * (2H + 3I) floats, small next to the
// layer's GEMMs).
#pragma once

#include <cstddef>
#include <cstdint>
#include <list>

namespace kt::engine {

class LoraStage {
 public:
  static LoraStage& instance();

  // A version number no engine has used yet: engines take a new one whenever their LoRA values
  // may have changed (set_lora, lora_updated), so equal versions mean equal contents.
  static uint64_t new_version();

  // The copy of engine `owner` for `floats` floats. Sets *fresh when it holds `version` already;
  // otherwise its contents are undefined and belong to no version until mark(). Callers hold the
  // engine lock; the pointer stays valid until the next acquire() or release().
  float* acquire(int64_t owner, uint64_t version, size_t floats, bool* fresh);
  void mark(int64_t owner, uint64_t version);
  // Drops the copy of `owner` (an engine closing).
  void drop(int64_t owner);
  size_t bytes() const { return bytes_; }
  // Frees every copy (kt_kernels.trim_memory()); the next calls convert again.
  void release();

 private:
  LoraStage();
  struct Copy {
    int64_t owner = -1;
    uint64_t version = 0;
    float* data = nullptr;
    size_t bytes = 0;
  };
  void free_copy(Copy& c);
  std::list<Copy> copies_;  // most recently used first
  size_t bytes_ = 0;
  size_t budget_ = 0;
};

}  // namespace kt::engine
