// On/off switches read from the environment (KT_HUGE_PAGES, KT_PIN_THREADS,
// KT_KERNELS_FUSED_DEQUANT), parsed one way.
#pragma once

#include <optional>

namespace kt::runtime {

// The switch `name`: unset, empty or "auto" -> std::nullopt (the caller's default); "1" / "on" ->
// true; "0" / "off" -> false (case and surrounding blanks ignored). Anything else throws
// std::invalid_argument naming the variable, its value and `values` (what each value does).
std::optional<bool> env_switch(const char* name, const char* values);

}  // namespace kt::runtime
