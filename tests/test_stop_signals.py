"""SIGTERM and the first Ctrl-C ask the training loop to save and stop; a second Ctrl-C stops at once."""

import os
import signal

import pytest

from vlretrieval.preemption import Preempted, StopSignalGuard


def test_the_first_ctrl_c_is_a_request_the_second_an_interrupt():
    with StopSignalGuard() as guard:
        assert not guard.requested()
        os.kill(os.getpid(), signal.SIGINT)  # handled between bytecodes: no KeyboardInterrupt
        assert guard.requested() and guard.signum == signal.SIGINT
        with pytest.raises(KeyboardInterrupt):  # raised by the handler, at the next bytecode
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # put back on exit


def test_sigterm_is_a_request_and_the_exit_status_names_the_signal():
    with StopSignalGuard() as guard:
        os.kill(os.getpid(), signal.SIGTERM)
        assert guard.requested() and guard.signum == signal.SIGTERM
        os.kill(os.getpid(), signal.SIGINT)  # a Ctrl-C after SIGTERM is still only a request
        assert guard.signum == signal.SIGTERM
    assert Preempted(5, "/run", signal.SIGINT).exit_status == 130
    assert Preempted(5, "/run").exit_status == 143
    assert "interrupted (Ctrl-C) at step 5" in str(Preempted(5, "/run", signal.SIGINT))
