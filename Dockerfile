# keyproxy: a small image that runs `keyproxy serve -c /etc/keyproxy/config.yaml` as a non-root user.
FROM python:3.12-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY keyproxy ./keyproxy
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

FROM python:3.12-slim
RUN useradd --system --no-create-home --uid 10001 keyproxy
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels
USER 10001
# The public port. The admin listener (/healthz, /readyz) binds server.admin_listen:
# set it to 0.0.0.0:9901 in the mounted config to probe it from outside the container.
EXPOSE 8080 9901
STOPSIGNAL SIGTERM
ENTRYPOINT ["keyproxy"]
CMD ["serve", "-c", "/etc/keyproxy/config.yaml"]
