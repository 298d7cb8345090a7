"""Console lines: info on stdout, warnings and errors on stderr with their prefix, and on a
multi-host run only process 0's info lines (the others' warnings name their host)."""

import logging

import pytest

from vlretrieval import log


@pytest.fixture
def process():
    yield log.set_process
    log.set_process(0, 1)


def test_info_warning_and_error_lines(capsys):
    logger = logging.getLogger("vlretrieval.some_module")
    logger.info("resuming from the checkpoint at step 3")
    logger.warning("skipping checkpoint 6")
    logger.error("config.train.num_steps must be positive")
    captured = capsys.readouterr()
    assert captured.out == "resuming from the checkpoint at step 3\n"
    assert captured.err.splitlines() == [
        "warning: skipping checkpoint 6", "error: config.train.num_steps must be positive"]


def test_other_hosts_print_only_warnings_and_errors_naming_the_host(capsys, process):
    logger = logging.getLogger("vlretrieval.train")
    process(1, 4)
    logger.info("model: decomposed")
    logger.warning("peer 2 lost")
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == "[host 1 of 4] warning: peer 2 lost\n"
    process(0, 4)
    logger.info("model: decomposed")
    assert capsys.readouterr().out == "model: decomposed\n"


def test_lines_are_not_printed_twice_through_the_root_logger(capsys):
    root_handler = logging.StreamHandler()
    logging.getLogger().addHandler(root_handler)
    try:
        logging.getLogger("vlretrieval.cli").warning("once")
    finally:
        logging.getLogger().removeHandler(root_handler)
    assert capsys.readouterr().err == "warning: once\n"
