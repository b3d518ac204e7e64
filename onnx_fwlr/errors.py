"""The one error type the library raises for problems a user can fix."""


class FwlrError(Exception):
    """A user-facing problem: the message is one plain sentence naming the problem and the fix.

    Everything below the CLI raises this instead of printing or exiting; the CLI turns it into a
    one-line message and exit code 2. Messages name parameters in library terms, in backticks
    (`ratio`, `calibration`); the CLI maps each to its flag (--ratio, --calib) in one place
    (cli/options.py FLAGS). Internal invariant failures are RuntimeError or AssertionError instead.
    """
