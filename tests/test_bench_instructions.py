"""The arithmetic of `make bench`'s instruction counts (bench/instructions.py): per check,
what N and 3N checks differ by, less the background the idle window shows."""

from bench.instructions import Window, spread, work_per_check


def windows(per_check: float, fixed: float, background_per_s: float, seconds_per_check: float, n: int):
    """A short, a long and an idle window of one process: each check's cost, the cost of
    opening and closing a loaded window, and a background proportional to time."""
    def run(checks: int, seconds: float) -> Window:
        return Window([round(checks * per_check + fixed + background_per_s * seconds)], seconds)
    return (run(n, n * seconds_per_check + 0.3), run(3 * n, 3 * n * seconds_per_check + 0.3),
            Window([round(background_per_s * 4.0)], 4.0))


def test_a_windows_fixed_cost_and_the_background_are_taken_out():
    short, long, idle = windows(per_check=750_000, fixed=2_000_000, background_per_s=700_000,
                                seconds_per_check=0.04, n=40)
    assert abs(work_per_check(short, long, idle, 40)[0] - 750_000) < 1


def test_each_process_is_counted_on_its_own():
    short = Window([100 * 40 + 5, 300 * 40 + 7], 1.0)
    long = Window([100 * 120 + 5, 300 * 120 + 7], 1.0)
    idle = Window([0, 0], 4.0)
    assert work_per_check(short, long, idle, 40) == [100, 300]


def test_spread_is_the_range_over_the_median():
    assert spread([99.0, 100.0, 101.0]) == 0.02
