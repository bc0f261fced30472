import hashlib
import os

from django.contrib import messages
from django.http import FileResponse, HttpResponse, JsonResponse, StreamingHttpResponse
from django.middleware.csrf import get_token
from django.shortcuts import redirect
from django.urls import reverse
from django.views.decorators.csrf import csrf_exempt

BLOB = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "blob.bin")
META_KEYS = ("REMOTE_ADDR", "SERVER_NAME", "SERVER_PORT", "SCRIPT_NAME", "PATH_INFO",
             "QUERY_STRING", "HTTP_HOST", "wsgi.url_scheme", "SERVER_PROTOCOL")


def seen(request, word=None):
    """What Django made of the request."""
    return JsonResponse({
        "meta": {key: request.META.get(key) for key in META_KEYS},
        "absolute": request.build_absolute_uri(),
        "host": request.get_host(),
        "secure": request.is_secure(),
        "path": request.path,
        "path_info": request.path_info,
        "GET": {key: request.GET.getlist(key) for key in request.GET},
        "reverse": reverse("done"),
        "word": word,
    })


def form(request):
    if request.method == "POST":
        request.session["name"] = request.POST.get("name", "")
        messages.info(request, "saved " + request.POST.get("name", ""))
        return redirect("done")
    token = get_token(request)
    return HttpResponse('<form method="post"><input type="hidden" '
                        f'name="csrfmiddlewaretoken" value="{token}"><input name="name"></form>')


def done(request):
    return JsonResponse({"name": request.session.get("name"),
                         "messages": [m.message for m in messages.get_messages(request)]})


def cookies(request):
    response = HttpResponse("cookies")
    response.set_cookie("a", "1")
    response.set_cookie("b", "2", httponly=True, samesite="Lax")
    request.session["visits"] = request.session.get("visits", 0) + 1
    return response


@csrf_exempt
def upload(request):
    found = {}
    for name, upload in request.FILES.items():
        digest = hashlib.sha256()
        for chunk in upload.chunks():
            digest.update(chunk)
        found[name] = [upload.name, upload.size, digest.hexdigest()]
    return JsonResponse({"files": found, "fields": dict(request.POST.items())})


def stream(request):
    return StreamingHttpResponse((b"line %d\n" % i for i in range(5)), content_type="text/plain")


def file(request):
    return FileResponse(open(BLOB, "rb"), as_attachment=True, filename="blob.bin")


def large(request):
    return HttpResponse(b"0123456789abcdef" * (1 << 18), content_type="application/octet-stream")


def boom(request):
    raise RuntimeError("a view that fails")


def hello(request):
    return HttpResponse("hello, version one")
