"""A small Flask application for tests/integration/test_frameworks.py: a login form with a
CSRF token in the session, cookies, redirects, uploads, streaming, send_file, and a view
that reports what Flask and Werkzeug computed from the environ."""

import hashlib
import os
import secrets

from flask import (
    Flask,
    Response,
    abort,
    jsonify,
    make_response,
    redirect,
    request,
    send_file,
    session,
    stream_with_context,
    url_for,
)

app = Flask(__name__)
app.secret_key = "preforkd-test-" + "k" * 32
BLOB = os.environ.get("PF_BLOB", "")


@app.route("/seen")
@app.route("/caf\u00e9/<word>")
def seen(word=None):
    return jsonify(
        url=request.url, host=request.host, scheme=request.scheme, root=request.root_path,
        path=request.path, remote=request.remote_addr, word=word,
        args={key: request.args.getlist(key) for key in request.args},
        external=url_for("seen", _external=True, q="\u00e9"),
        server=[request.environ["SERVER_NAME"], request.environ["SERVER_PORT"]],
    )


@app.route("/login", methods=["GET", "POST"])
def login():
    if request.method == "POST":
        if not session.get("csrf") or request.form.get("csrf") != session["csrf"]:
            abort(400)
        session["user"] = request.form["user"]
        return redirect(url_for("whoami"))
    session["csrf"] = token = secrets.token_hex(8)
    return f'<form method="post"><input name="csrf" value="{token}"><input name="user"></form>'


@app.route("/whoami")
def whoami():
    return jsonify(user=session.get("user"))


@app.route("/cookies")
def cookies():
    response = make_response("cookies")
    response.set_cookie("a", "1")
    response.set_cookie("b", "2", httponly=True, samesite="Lax")
    session["visits"] = session.get("visits", 0) + 1
    return response


@app.route("/upload", methods=["POST"])
def upload():
    files = {}
    for name, storage in request.files.items():
        data = storage.read()
        files[name] = [storage.filename, len(data), hashlib.sha256(data).hexdigest()]
    return jsonify(files=files, fields=request.form.to_dict())


@app.route("/echo", methods=["POST"])
def echo():
    body = request.get_data()
    return jsonify(length=len(body), sha256=hashlib.sha256(body).hexdigest())


@app.route("/stream")
def stream():
    def lines():
        for i in range(5):
            yield f"line {i} of {request.path}\n"
    return Response(stream_with_context(lines()), mimetype="text/plain")


@app.route("/file")
def file():
    return send_file(BLOB, as_attachment=True, download_name="blob.bin")


@app.route("/large")
def large():
    return Response(b"0123456789abcdef" * (1 << 18), mimetype="application/octet-stream")


@app.route("/boom")
def boom():
    raise RuntimeError("a view that fails")
