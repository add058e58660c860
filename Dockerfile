# keyproxy: a small image that runs `keyproxy serve -c /etc/keyproxy/config.yaml` as a non-root user.
FROM python:3.12-slim AS build
# The compiled build (setup.py): the request path as C extensions, ~20 % less CPU per
# request. The compiler stays in this stage; the image gets the wheel only.
RUN apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev \
  && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml setup.py README.md ./
COPY keyproxy ./keyproxy
RUN KEYPROXY_COMPILE=1 pip wheel --no-cache-dir --wheel-dir /wheels .

FROM python:3.12-slim
RUN useradd --system --no-create-home --uid 10001 keyproxy
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels
USER 10001
# The public port. The admin listener (/metrics, /healthz, /readyz) binds server.admin_listen:
# set it to 0.0.0.0:9901 in the mounted config to probe it from outside the container.
EXPOSE 8080 9901
STOPSIGNAL SIGTERM
# Ready = the configuration is loaded and the upstream answers (503 while draining).
# Python, not curl: slim images have no curl. KEYPROXY_ADMIN names server.admin_listen
# when it is not the default (a 0.0.0.0 admin listener is reached on 127.0.0.1).
ENV KEYPROXY_ADMIN=127.0.0.1:9901
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
  CMD ["python", "-c", "import os, sys, urllib.request as r\ntry: sys.exit(r.urlopen('http://%s/readyz' % os.environ['KEYPROXY_ADMIN'], timeout=2).status != 200)\nexcept Exception: sys.exit(1)"]
ENTRYPOINT ["keyproxy"]
CMD ["serve", "-c", "/etc/keyproxy/config.yaml"]
