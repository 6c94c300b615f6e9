"""Preemption notices: the watcher polls a loopback stand-in for each provider's metadata service.

The server (tests/support/metadata_server.py) answers as each provider documents (EC2 IMDSv2
token handshake, GCE's Metadata-Flavor header, Azure's Metadata header and event list); it
starts with no notice, then one appears and the watcher must see it within a deadline. A
server that never answers must not block `seen` or `stop()`, and a closed port is "no
notice", logged once.
"""

from __future__ import annotations

import argparse
import logging
import secrets

import pytest

from conftest import free_port, wait_for
from dist_train.config.job import add_config_arguments, resolve
from dist_train.errors import UserError
from dist_train.training import notice as notice_mod
from dist_train.training.config import TrainConfig
from dist_train.training.notice import NoticeWatcher, check_source, parse_source
from support.metadata_server import PROBE_PATHS, MetadataServer


@pytest.fixture
def server():
    srv = MetadataServer()
    yield srv
    srv.close()


@pytest.fixture
def watchers():
    """Every watcher a test makes is stopped at its end, even when the test fails."""
    made: list[NoticeWatcher] = []

    def make(source: str, **kwargs) -> NoticeWatcher:
        watcher = NoticeWatcher(source, **kwargs)
        made.append(watcher)
        return watcher

    yield make
    for watcher in made:
        watcher.stop()


# --- each provider, as documented ----------------------------------------------------------------

@pytest.mark.timeout(30)
@pytest.mark.parametrize("provider", ["aws", "gcp", "azure", "url"])
def test_the_watcher_sees_a_notice_that_appears(provider, server, watchers, monkeypatch, caplog):
    # Metadata services are never reached through a proxy: a dead proxy in the environment changes nothing.
    monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setenv("http_proxy", f"http://127.0.0.1:{free_port()}")
    caplog.set_level(logging.DEBUG, logger="dist_train.training.notice")
    watcher = watchers(server.source(provider), interval_s=0.02).start()
    path = PROBE_PATHS[provider]
    wait_for(lambda: server.count(path) >= 3, 10, what="three polls without a notice")
    assert not watcher.seen and "polling" in watcher.describe()

    server.notice.set()
    wait_for(lambda: watcher.seen, 10, what=f"the {provider} notice to be seen")
    assert watcher.seen  # latched
    assert "notice seen" in watcher.describe()
    polls = server.count(path)
    server.notice.clear()
    assert watcher.seen  # still: a notice is not taken back
    watcher.stop()
    assert server.count(path) == polls  # no polling after the notice
    assert not [r for r in caplog.records if "unreachable" in r.getMessage()]
    assert server.token not in caplog.text


@pytest.mark.timeout(30)
def test_aws_uses_an_imdsv2_token_and_renews_it(server, watchers, monkeypatch, caplog):
    caplog.set_level(logging.DEBUG, logger="dist_train.training.notice")
    watcher = watchers(f"aws={server.base}")
    assert watcher.poll() is False
    [ttl] = server.token_ttls
    assert int(ttl) == notice_mod.AWS_TOKEN_TTL_S
    gets = [h for m, p, h in server.requests if m == "GET"]
    assert all(h.get("X-aws-ec2-metadata-token") == server.token for h in gets)
    watcher.poll()
    assert len(server.token_ttls) == 1  # reused while valid

    server.token = secrets.token_urlsafe(24)  # the old one is refused from now on (401)
    watcher.poll()  # refused: no notice, and the token is dropped
    watcher.poll()  # a new token
    assert len(server.token_ttls) == 2 and not watcher.seen

    # A token near its expiry is renewed before use.
    monkeypatch.setattr(notice_mod, "AWS_TOKEN_MARGIN_S", notice_mod.AWS_TOKEN_TTL_S)
    fresh = watchers(f"aws={server.base}")
    fresh.poll()
    fresh.poll()
    assert len(server.token_ttls) == 4
    server.notice.set()
    assert fresh.poll() is True and "terminate" in fresh.describe()
    assert server.token not in caplog.text


def test_azure_counts_only_preempt_and_terminate_for_this_vm(server, watchers):
    watcher = watchers(f"azure={server.base}")
    server.notice.set()
    server.azure_events = [
        {"EventId": "1", "EventType": "Freeze", "Resources": [server.vm_name], "EventStatus": "Scheduled"},
        {"EventId": "2", "EventType": "Preempt", "Resources": ["another-vm"], "EventStatus": "Scheduled"},
    ]
    assert watcher.poll() is False
    server.azure_events.append({"EventId": "3", "EventType": "Terminate", "Resources": [server.vm_name],
                                "EventStatus": "Scheduled", "NotBefore": "Mon, 01 Sep 2026 12:10:00 GMT"})
    assert watcher.poll() is True
    assert "Terminate" in watcher.describe() and "12:10:00" in watcher.describe()


def test_azure_without_a_vm_name_counts_a_preempt_for_any_vm(server, watchers):
    server.name_status = 404
    server.notice.set()
    server.azure_events = [{"EventId": "1", "EventType": "Preempt", "Resources": ["another-vm"],
                            "EventStatus": "Scheduled"}]
    assert watchers(f"azure={server.base}").poll() is True


def test_a_url_answering_200_with_an_empty_body_is_no_notice(server, watchers):
    server.notice.set()
    server.url_body = b"   "
    watcher = watchers(f"{server.base}/notice")
    assert watcher.poll() is False
    server.url_body = b"terminating"
    assert watcher.poll() is True


def test_the_log_shows_no_credentials_or_query():
    watcher = NoticeWatcher("https://user:hunter2pass@notices.example.com:8443/spot?sig=abc123def")
    text = watcher.describe()
    assert "notices.example.com:8443/spot" in text
    assert "hunter2pass" not in text and "abc123def" not in text and "user" not in text


# --- endpoints that are down or hang ---------------------------------------------------------------

@pytest.mark.timeout(30)
def test_a_hanging_endpoint_blocks_neither_seen_nor_stop(server, watchers):
    server.hang.set()
    watcher = watchers(f"gcp={server.base}", interval_s=0.02, timeout_s=60).start()
    wait_for(lambda: server.count(PROBE_PATHS["gcp"]) >= 1, 10, what="the request in flight")
    assert not watcher.seen  # answered while the watcher thread waits on the socket
    watcher.stop()
    # stop() returned while the request is still in flight (it would take 60 s to time out).
    assert watcher._thread.is_alive()


@pytest.mark.parametrize("provider", ["aws", "gcp", "azure", "url"])
def test_a_closed_port_is_no_notice_and_logged_once(provider, watchers, caplog):
    caplog.set_level(logging.DEBUG, logger="dist_train.training.notice")
    base = f"http://127.0.0.1:{free_port()}"
    watcher = watchers(f"{base}/notice" if provider == "url" else f"{provider}={base}", timeout_s=1)
    for _ in range(3):
        assert watcher.poll() is False
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "unreachable" in warnings[0].getMessage()
    assert not watcher.seen


def test_a_slow_answer_is_no_notice(server, watchers):
    server.hang.set()
    watcher = watchers(f"{server.base}/notice", timeout_s=0.2)
    assert watcher.poll() is False and not watcher.seen


# --- configuration ---------------------------------------------------------------------------------

@pytest.mark.parametrize("value, provider, url", [
    ("aws", "aws", "http://169.254.169.254"),
    ("gcp", "gcp", "http://metadata.google.internal"),
    ("azure", "azure", "http://169.254.169.254"),
    ("aws=http://127.0.0.1:8080/", "aws", "http://127.0.0.1:8080"),
    ("http://notices.internal/spot", "url", "http://notices.internal/spot"),
])
def test_sources_parse(value, provider, url):
    assert parse_source(value) == (provider, url)
    assert check_source(value) is None


@pytest.mark.parametrize("value", ["ibm", "ftp://host/x", "aws=169.254.169.254", "gcp=", "http://", "http://h:99999"])
def test_bad_sources_say_what_is_accepted(value):
    assert "http" in check_source(value)


def parse_train(argv: list[str]):
    parser = argparse.ArgumentParser()
    add_config_arguments(parser)
    return resolve(parser.parse_args(argv))


def test_flags_and_from_config():
    cfg = parse_train(["--preemption-notice", "gcp", "--exit-on-notice", "--notice-interval", "2"])
    assert cfg.train.preemption_notice == "gcp" and cfg.train.exit_on_notice and cfg.train.notice_interval == 2
    watcher = NoticeWatcher.from_config(cfg.train)
    assert watcher.provider == "gcp" and watcher.interval_s == 2 and not watcher.seen
    assert NoticeWatcher.from_config(cfg.train, local_rank=1) is None  # one poller per node
    assert NoticeWatcher.from_config(TrainConfig()) is None  # off by default
    # Where notices come from does not change what is trained.
    assert cfg.fingerprint() == parse_train([]).fingerprint()


def test_a_bad_source_is_a_user_error():
    with pytest.raises(UserError, match="preemption_notice"):
        parse_train(["--preemption-notice", "ftp://nowhere"])
