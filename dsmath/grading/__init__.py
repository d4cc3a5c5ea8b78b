"""Answer grading that is right, fast and never hangs.

``extract_answer`` finds the stated final answer; ``math_equal`` compares two answers; ``grade`` explains one
verdict; ``grade_batch`` / ``GradingPool`` grade many with killable sympy workers. Importing this package does
not import sympy (only the worker processes and ``dsmath.grading.symbolic`` do).
"""

from dsmath.grading.extract import extract_answer
from dsmath.grading.normalize import normalize
from dsmath.grading.pool import GradingPool, Verdict, default_pool, grade, grade_batch, math_equal

__all__ = ["extract_answer", "math_equal", "grade", "grade_batch", "Verdict", "GradingPool", "normalize",
           "default_pool"]
