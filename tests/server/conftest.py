"""Clients for the server tests: each module serves its own app on a real uvicorn
(`base_url`, defined in the module, since the apps differ), and talks to it through the
openai SDK (`client`) or plain HTTP (`http`)."""

from __future__ import annotations

import httpx
import pytest
from openai import OpenAI


@pytest.fixture(scope="module")
def client(base_url):
    return OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def http(base_url):
    with httpx.Client(base_url=base_url, timeout=120) as c:
        yield c
