"""Egress guard for the img2dataset processes: loaded as ``sitecustomize`` (``PYTHONPATH`` points at this
folder) by ``tasks.data.img2dataset_runner``; inert unless ``MVLM_EGRESS_GUARD=1``.

The URL policy checks URLs before the download, but it does not resolve names, and img2dataset
(urllib) follows redirects. This guard runs inside the downloader, at connect time:

* ``socket.getaddrinfo`` is wrapped: when any address a name resolves to is loopback, private,
  link-local, unspecified or otherwise not public, and neither the name nor the address is in the
  spec's ``allow_hosts`` (``MVLM_EGRESS_ALLOW``, a JSON list), the lookup fails with
  ``mvlm egress guard: ...``. urllib connects to the addresses that lookup returned, so the checked
  address is the one connected to: a name that resolves to an internal address (DNS rebinding) and a
  redirect to an internal address both fail here. Proxy hosts from the environment are allowed.
* urllib's redirect handler is replaced by one that refuses redirects to schemes other than http
  and https (urllib itself would follow one to ``ftp:``).

It only covers Python sockets in processes started with this environment; see
``docs/untrusted-inputs.md`` for what it does not cover.
"""

from __future__ import annotations

import os

if os.environ.get("MVLM_EGRESS_GUARD") == "1":
    import importlib.util
    import json
    import socket
    import sys
    import urllib.error
    import urllib.request
    from pathlib import Path
    from urllib.parse import urlsplit

    _spec = importlib.util.spec_from_file_location(
        "mvlm_url_policy", Path(__file__).resolve().parent.parent / "url_policy.py"
    )
    _policy_module = importlib.util.module_from_spec(_spec)
    sys.modules["mvlm_url_policy"] = _policy_module
    _spec.loader.exec_module(_policy_module)

    _allow = list(json.loads(os.environ.get("MVLM_EGRESS_ALLOW") or "[]"))
    _allow += [urlsplit(url).hostname or "" for url in urllib.request.getproxies().values() if "//" in url]
    _POLICY = _policy_module.HostPolicy.from_allow([a for a in _allow if a])
    _real_getaddrinfo = socket.getaddrinfo

    class EgressRefused(OSError):
        """A connection the guard refused."""

    def _guarded_getaddrinfo(host, port, family=0, type=0, proto=0, flags=0):
        results = _real_getaddrinfo(host, port, family, type, proto, flags)
        if host is None:
            return results
        name = host.decode("ascii", "replace") if isinstance(host, bytes) else str(host)
        for *_, sockaddr in results:
            if isinstance(sockaddr, tuple) and sockaddr and isinstance(sockaddr[0], str):
                why = _policy_module.address_problem(name, sockaddr[0], _POLICY)
                if why:
                    raise EgressRefused(f"mvlm egress guard: {why}; not in the spec's allow_hosts")
        return results

    class _SchemeCheckingRedirects(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, req, fp, code, msg, headers, newurl):
            scheme = urlsplit(newurl).scheme.lower()
            if scheme not in ("http", "https"):
                raise urllib.error.URLError(
                    f"mvlm egress guard: redirect to {newurl!r} refused (scheme {scheme!r}; only http, https)"
                )
            return super().redirect_request(req, fp, code, msg, headers, newurl)

    socket.getaddrinfo = _guarded_getaddrinfo
    urllib.request.install_opener(urllib.request.build_opener(_SchemeCheckingRedirects))
    if not os.environ.get("MVLM_EGRESS_GUARD_ANNOUNCED"):
        os.environ["MVLM_EGRESS_GUARD_ANNOUNCED"] = "1"  # spawned workers inherit it and stay quiet
        print(f"mvlm egress guard active; allow_hosts {sorted(_allow)}", file=sys.stderr, flush=True)
