// A small test runner for the C++ tests (no GoogleTest: the GPU machine has no network to
// install it). FLORA_TEST(name) registers a test; tests/cpp/CMakeLists.txt finds the names in
// the source and adds one ctest test per name, run as `flora_cpp_tests <name>`.
#pragma once

#include <c10/util/Exception.h>

#include <cstdio>
#include <exception>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

namespace flora_test {

struct TestCase {
  const char* name;
  void (*run)();
};

inline std::vector<TestCase>& registry() {
  static std::vector<TestCase> tests;
  return tests;
}

struct Register {
  Register(const char* name, void (*run)()) { registry().push_back({name, run}); }
};

struct Failure : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// Thrown by a test that cannot run here (no GPU); the runner exits with kSkipped.
struct Skipped : std::runtime_error {
  using std::runtime_error::runtime_error;
};
constexpr int kSkipped = 77;  // SKIP_RETURN_CODE in tests/cpp/CMakeLists.txt

[[noreturn]] inline void fail(const char* file, int line, const std::string& what) {
  std::ostringstream out;
  out << file << ":" << line << ": " << what;
  throw Failure(out.str());
}

inline bool contains(const std::string& text, const std::string& part) {
  return text.find(part) != std::string::npos;
}

}  // namespace flora_test

#define FLORA_TEST(name)                                                            \
  static void flora_test_##name();                                                  \
  static const ::flora_test::Register flora_test_register_##name(#name,             \
                                                                 &flora_test_##name); \
  static void flora_test_##name()

#define REQUIRE(cond)                                                        \
  do {                                                                     \
    if (!(cond)) ::flora_test::fail(__FILE__, __LINE__, "REQUIRE(" #cond ")"); \
  } while (0)

// REQUIRE(a == b) that prints both sides.
#define REQUIRE_EQ(a, b)                                                                   \
  do {                                                                                   \
    const auto& flora_a_ = (a);                                                          \
    const auto& flora_b_ = (b);                                                          \
    if (!(flora_a_ == flora_b_)) {                                                       \
      std::ostringstream flora_out_;                                                     \
      flora_out_ << "REQUIRE_EQ(" #a ", " #b "): " << flora_a_ << " != " << flora_b_;      \
      ::flora_test::fail(__FILE__, __LINE__, flora_out_.str());                          \
    }                                                                                    \
  } while (0)

// `statement` must throw c10::Error whose message contains `part`.
#define REQUIRE_THROWS_WITH(statement, part)                                                \
  do {                                                                                    \
    bool flora_threw_ = false;                                                            \
    try {                                                                                 \
      statement;                                                                          \
    } catch (const c10::Error& flora_e_) {                                                \
      flora_threw_ = true;                                                                \
      const std::string flora_msg_ = flora_e_.what_without_backtrace();                   \
      if (!::flora_test::contains(flora_msg_, part)) {                                    \
        ::flora_test::fail(__FILE__, __LINE__,                                            \
                           std::string("error message '") + flora_msg_ + "' lacks '" +    \
                               (part) + "'");                                             \
      }                                                                                   \
    }                                                                                     \
    if (!flora_threw_) {                                                                  \
      ::flora_test::fail(__FILE__, __LINE__, "no c10::Error from: " #statement);          \
    }                                                                                     \
  } while (0)
