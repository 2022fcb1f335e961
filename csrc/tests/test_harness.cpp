// Self-test of the ctest harness and of testing.h: a passing check passes, a failing one is
// counted, NaN matches only NaN. Runs even before any op core exists.
#include <cmath>
#include <vector>

#include "testing.h"

int main() {
  const std::vector<float> want = {1.0f, -2.0f, NAN, 0.0f};
  std::vector<float> got = want;
  CBD_CHECK_CLOSE(got.data(), want.data(), got.size(), 0.0, 0.0);

  // first_mismatch finds a perturbed element and reports the worst error.
  got[1] = -2.5f;
  double err = 0.0;
  CBD_CHECK(cbd_test::first_mismatch(got.data(), want.data(), got.size(), 1e-3, 1e-3, &err) == 1,
            "expected a mismatch at index 1");
  CBD_CHECK(std::fabs(err - 0.5) < 1e-12, "max err " << err);
  // ... within tolerance it passes ...
  CBD_CHECK(cbd_test::first_mismatch(got.data(), want.data(), got.size(), 0.6, 0.0) == got.size(),
            "atol 0.6 should accept an error of 0.5");
  // ... and NaN against a number is a mismatch.
  got[2] = 0.0f;
  CBD_CHECK(cbd_test::first_mismatch(got.data(), want.data(), got.size(), 1.0, 1.0) == 2,
            "NaN vs number must mismatch");

  // A failing check is counted (then forgiven so this self-test passes).
  const int before = cbd_test::failures();
  CBD_CHECK(1 + 1 == 3, "this failure is expected (harness self-test)");
  CBD_CHECK(cbd_test::failures() == before + 1, "failure was not counted");
  cbd_test::failures() = before;

#ifdef CBD_FAST_WITH_OPENMP
  CBD_CHECK(true, "built with OpenMP");
#endif
  return cbd_test::finish("test_harness");
}
