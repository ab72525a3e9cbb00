"""The ceiling: a bare Flask route returning a constant (bench/api.py runs it under
the API's gunicorn settings)."""

from __future__ import annotations

from flask import Flask

app = Flask(__name__)


@app.get("/")
def constant() -> tuple[bytes, int, dict[str, str]]:
    return b'{"ok":true}', 200, {"Content-Type": "application/json"}
