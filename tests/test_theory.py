"""The single-layer theory (docs/theory.md) on Gaussian data: GPFQ's error falls like 1/N0 once N0 ≫ m,
round-to-nearest's does not."""
import pytest

from helpers import theory_errors, theory_slope

M = 64
N0_VALUES = (4 * M, 8 * M, 16 * M)


@pytest.fixture(scope="module")
def errors():
    return theory_errors(M, N0_VALUES, trials=3, neurons=8, seed=0, methods=("gpfq", "msq", "qronos"), bits=4)


@pytest.mark.slow  # the module's Gaussian layers: ~30 s of CPU
def test_gpfq_error_decays_like_one_over_n0(errors):
    assert list(errors["gpfq"]) == list(N0_VALUES)
    assert theory_slope(errors["gpfq"], 4 * M, 16 * M) <= -0.7


@pytest.mark.slow  # the module's Gaussian layers: ~30 s of CPU
def test_gpfq_at_least_five_times_below_msq_at_16m(errors):
    assert errors["gpfq"][16 * M] * 5 <= errors["msq"][16 * M]


@pytest.mark.slow  # the module's Gaussian layers: ~30 s of CPU
def test_qronos_error_decays_and_stays_far_below_msq(errors):
    """With X̃ = X, Qronos is GPTQ's walk with a small ridge: its error falls with N0 like GPFQ's."""
    assert theory_slope(errors["qronos"], 4 * M, 16 * M) <= -0.7
    assert errors["qronos"][16 * M] * 5 <= errors["msq"][16 * M]


@pytest.mark.slow  # the module's Gaussian layers: ~30 s of CPU
def test_msq_error_is_the_uniform_rounding_error(errors):
    """Round-to-nearest on a grid of step δ leaves (about) δ²/12 per weight: relative to E w² = 1/3 for
    w ~ U[−1, 1] on the 4-bit gpfq2022 grid (δ = 2·rad/15, rad ≈ 1) that is (2/15)²/12 · 3 ≈ 4.4e-3,
    whatever N0 is."""
    expected = (2 / 15) ** 2 / 12 * 3
    for value in errors["msq"].values():
        assert value == pytest.approx(expected, rel=0.15)


def test_fitted_slope_recovers_a_power_law():
    n0 = [100, 200, 400, 800]
    assert theory_slope({k: 3.0 * k ** -1.25 for k in n0}) == pytest.approx(-1.25, abs=1e-12)
    assert theory_slope({k: 3.0 * k ** -1.25 for k in n0}, 200, 800) == pytest.approx(-1.25, abs=1e-12)
    # a point outside the range does not pull the fit
    assert theory_slope({**{k: 3.0 * k ** -1.25 for k in n0}, 50: 1.0}, 100, 800) == pytest.approx(-1.25, abs=1e-12)
