#include "runtime/env_switch.h"

#include <algorithm>
#include <cctype>
#include <cstdlib>
#include <stdexcept>
#include <string>

namespace kt::runtime {

std::optional<bool> env_switch(const char* name, const char* values) {
  const char* env = std::getenv(name);
  std::string v = env != nullptr ? env : "";
  v.erase(0, v.find_first_not_of(" \t"));
  v.erase(v.find_last_not_of(" \t") + 1);
  std::transform(v.begin(), v.end(), v.begin(),
                 [](unsigned char ch) { return static_cast<char>(std::tolower(ch)); });
  if (v.empty() || v == "auto") return std::nullopt;
  if (v == "1" || v == "on") return true;
  if (v == "0" || v == "off") return false;
  throw std::invalid_argument(std::string(name) + "='" + env + "': expected " + values);
}

}  // namespace kt::runtime
