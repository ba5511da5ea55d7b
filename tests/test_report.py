"""The paired comparison the report prints under its table."""

import math
import random

from mlx_distill.report import sign_test


def test_sign_test_values():
    assert sign_test(0, 0) == 1.0
    assert sign_test(3, 3) == 1.0
    assert math.isclose(sign_test(5, 0), 2 / 32)
    assert math.isclose(sign_test(10, 2), 2 * (1 + 12 + 66) / 4096)


def test_sign_test_is_symmetric_and_matches_the_binomial_tail():
    rng = random.Random(random.randrange(1 << 30))
    for _ in range(20):
        a, b = rng.randrange(0, 40), rng.randrange(0, 40)
        n, low = a + b, min(a, b)
        # reference: sum of the two binomial tails in exact fractions
        tail = sum(math.comb(n, i) for i in range(low + 1))
        expected = min(1.0, 2 * tail / 2**n) if n else 1.0
        assert math.isclose(sign_test(a, b), expected, rel_tol=1e-12)
        assert sign_test(a, b) == sign_test(b, a)
