# quart-sse: slim Python 3.13, the newest the suite runs on (tests/test_containers.py runs this CMD on it and
# checks the SIGTERM goodbye), the package installed from this checkout, non-root.
FROM python:3.13-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    APP_PORT=8080

WORKDIR /src
# the pinned runtime requirements first: this layer is rebuilt only when requirements.txt changes
COPY requirements.txt .
RUN pip install -r requirements.txt \
    && useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin sse

# the package itself (quart_sse, blueprints, the demo page, the quart-sse script); --no-deps: the pins above rule
COPY pyproject.toml README.md ./
COPY quart_sse ./quart_sse
COPY blueprints ./blueprints
RUN pip install --no-deps . \
    && rm -rf build ./*.egg-info

WORKDIR /app
USER 10001
EXPOSE 8080
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('APP_PORT', '8080'), timeout=2)"]
STOPSIGNAL SIGTERM
CMD ["quart-sse", "serve"]
