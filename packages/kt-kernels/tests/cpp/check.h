// A minimal test harness for the C++ tests (no third-party test framework to fetch or install).
#pragma once

#include <cstdio>
#include <cstdlib>
#include <functional>
#include <string>
#include <utility>
#include <vector>

namespace kt::testing {

struct Failure {};

inline std::vector<std::pair<std::string, std::function<void()>>>& registry() {
  static std::vector<std::pair<std::string, std::function<void()>>> tests;
  return tests;
}

struct Register {
  Register(const char* name, std::function<void()> fn) {
    registry().emplace_back(name, std::move(fn));
  }
};

inline int& failures() {
  static int n = 0;
  return n;
}

// Runs every registered test whose name contains argv[1] (all when absent); exit code = failures.
inline int run_all(int argc, char** argv) {
  const std::string filter = argc > 1 ? argv[1] : "";
  int run = 0, failed = 0;
  for (auto& [name, fn] : registry()) {
    if (!filter.empty() && name.find(filter) == std::string::npos) continue;
    ++run;
    const int before = failures();
    try {
      fn();
    } catch (const Failure&) {
    } catch (const std::exception& e) {
      std::printf("  unexpected exception: %s\n", e.what());
      ++failures();
    }
    const bool ok = failures() == before;
    failed += ok ? 0 : 1;
    std::printf("[%s] %s\n", ok ? "  OK  " : " FAIL ", name.c_str());
  }
  std::printf("%d tests, %d failed\n", run, failed);
  return failed == 0 && run > 0 ? 0 : 1;
}

}  // namespace kt::testing

#define KT_CONCAT2(a, b) a##b
#define KT_CONCAT(a, b) KT_CONCAT2(a, b)
#define TEST(name)                                                                      \
  static void KT_CONCAT(test_, name)();                                                 \
  static ::kt::testing::Register KT_CONCAT(reg_, name)(#name, &KT_CONCAT(test_, name)); \
  static void KT_CONCAT(test_, name)()

// Fails the current test (and stops it) with a message.
#define REQUIRE(cond, ...)                                                     \
  do {                                                                         \
    if (!(cond)) {                                                             \
      std::printf("  %s:%d: REQUIRE(%s) failed: ", __FILE__, __LINE__, #cond); \
      std::printf(__VA_ARGS__);                                                \
      std::printf("\n");                                                       \
      ++::kt::testing::failures();                                             \
      throw ::kt::testing::Failure{};                                          \
    }                                                                          \
  } while (0)
