"""No credential literal anywhere in the repository.

Tests make throwaway credentials at run time (conftest.s3_credentials); manifests
and docs carry placeholders only. This scans every file git would pick up
(tracked, or untracked and not ignored) for AWS key patterns.
"""

from __future__ import annotations

import re
import secrets
import subprocess

import pytest

from conftest import REPO

# Access key ids: AKIA (long-term), ASIA (temporary) and the other documented prefixes, 16 more characters.
ACCESS_KEY_ID = re.compile(r"(?<![A-Z0-9])(?:AKIA|ASIA|ABIA|ACCA|AGPA|AIDA|AIPA|ANPA|ANVA|AROA|APKA)[A-Z0-9]{16}(?![A-Z0-9])")
# A 40-character secret assigned to something that names it, in code, YAML, env or ini form.
SECRET_KEY = re.compile(r"(?i)(?:aws_?secret_?access_?key|secret_?access_?key|aws_?secret)[\"']?\s*[:=]\s*[\"']?"
                        r"(?P<value>[A-Za-z0-9/+]{40})(?![A-Za-z0-9/+=])")
SESSION_TOKEN = re.compile(r"(?i)aws_?session_?token[\"']?\s*[:=]\s*[\"']?(?P<value>[A-Za-z0-9/+=]{100,})")
PATTERNS = {"AWS access key id": ACCESS_KEY_ID, "AWS secret access key": SECRET_KEY,
            "AWS session token": SESSION_TOKEN}


def repo_files() -> list[str]:
    try:
        out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                             capture_output=True, check=True).stdout
        return sorted({name for name in out.decode().split("\0") if name})
    except (OSError, subprocess.CalledProcessError):  # not a git checkout: every file but the usual noise
        skip = {".git", ".venv", "runs", "__pycache__", ".pytest_cache"}
        return sorted(str(p.relative_to(REPO)) for p in REPO.rglob("*")
                      if p.is_file() and not skip & set(p.relative_to(REPO).parts))


def findings(text: str) -> list[str]:
    return [f"{what}: {match.group(0)[:12]}..." for what, pattern in PATTERNS.items()
            for match in pattern.finditer(text)]


def test_patterns_catch_made_up_credentials():
    key_id = "AKIA" + "".join(secrets.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ234567") for _ in range(16))
    secret = "".join(secrets.choice("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789/+")
                     for _ in range(40))
    for text in (f"aws_access_key_id = {key_id}", f'"{key_id}"', f"AWS_SECRET_ACCESS_KEY={secret}",
                 f'aws_secret_access_key: "{secret}"', f"'SecretAccessKey': '{secret}'"):
        assert findings(text), text
    for text in ('AWS_SECRET_ACCESS_KEY: "<secret-access-key>"', '"AKIA" + secrets.token_hex(8).upper()',
                 "secret_access_key = os.environ['AWS_SECRET_ACCESS_KEY']"):
        assert not findings(text), text


def test_no_credentials_in_the_repository():
    files = repo_files()
    assert "dist_train/errors.py" in files  # the scan sees the repository
    problems = []
    for name in files:
        path = REPO / name
        if not path.is_file() or path.stat().st_size > 5_000_000:
            continue
        data = path.read_bytes()
        if b"\0" in data[:8192]:
            continue  # binary
        problems += [f"{name}: {finding}" for finding in findings(data.decode("utf-8", "replace"))]
    if problems:
        pytest.fail("credential-like literals:\n" + "\n".join(problems), pytrace=False)
