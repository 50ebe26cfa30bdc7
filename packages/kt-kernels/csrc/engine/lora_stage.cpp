#include "engine/lora_stage.h"

#include <atomic>
#include <cstdlib>
#include <new>
#include <string>

#include "engine/tensor.h"
#include "runtime/big_alloc.h"
#include "runtime/memory_stats.h"

namespace kt::engine {

namespace {
constexpr size_t kPage = 4096;

size_t budget_from_env() {
  const char* env = std::getenv("KT_LORA_STAGE_MIB");
  if (env == nullptr || *env == '\0') return size_t{128} << 20;
  char* end = nullptr;
  const double mib = std::strtod(env, &end);
  if (end == env || *end != '\0' || !(mib >= 0) || mib > 1e9) {
    throw ValueError(std::string("KT_LORA_STAGE_MIB='") + env +
                     "': expected a number of MiB >= 0 (0: keep only the running layer's LoRA "
                     "copy; unset: 128)");
  }
  return static_cast<size_t>(mib * 1048576.0);
}
}  // namespace

LoraStage::LoraStage() : budget_(budget_from_env()) {}

LoraStage& LoraStage::instance() {
  // Never destroyed: engines may be closed from atexit handlers after static destructors ran.
  static LoraStage* stage = new LoraStage();
  return *stage;
}

uint64_t LoraStage::new_version() {
  static std::atomic<uint64_t> next{1};
  return next.fetch_add(1);
}

float* LoraStage::acquire(int64_t owner, uint64_t version, size_t floats, bool* fresh) {
  const size_t need = runtime::big_alloc_size(floats * sizeof(float), kPage);
  auto it = copies_.begin();
  while (it != copies_.end() && it->owner != owner) ++it;
  if (it != copies_.end() && it->bytes >= need) {
    copies_.splice(copies_.begin(), copies_, it);
    *fresh = it->version == version;
    if (!*fresh) it->version = 0;
    return it->data;
  }
  if (it != copies_.end()) {
    free_copy(*it);
    copies_.erase(it);
  }
  // Evict the least recently used copies until the new one fits (or none is left).
  while (!copies_.empty() && bytes_ + need > budget_) {
    free_copy(copies_.back());
    copies_.pop_back();
  }
  void* p = runtime::big_alloc(need, kPage);
  copies_.push_front(Copy{owner, 0, static_cast<float*>(p), need});
  bytes_ += need;
  runtime::mem_add(runtime::MemKind::lora, need);
  *fresh = false;
  return copies_.front().data;
}

void LoraStage::mark(int64_t owner, uint64_t version) {
  for (Copy& c : copies_) {
    if (c.owner == owner) c.version = version;
  }
}

void LoraStage::drop(int64_t owner) {
  for (auto it = copies_.begin(); it != copies_.end(); ++it) {
    if (it->owner == owner) {
      free_copy(*it);
      copies_.erase(it);
      return;
    }
  }
}

void LoraStage::free_copy(Copy& c) {
  if (c.data == nullptr) return;
  runtime::mem_sub(runtime::MemKind::lora, c.bytes);
  bytes_ -= c.bytes;
  runtime::big_free(c.data, c.bytes);
  c.data = nullptr;
}

void LoraStage::release() {
  for (Copy& c : copies_) free_copy(c);
  copies_.clear();
}

}  // namespace kt::engine
