# Image for compose.yaml (hosts with a container engine).
FROM python:3.11-slim
WORKDIR /opt/bluestream
COPY pyproject.toml requirements.lock README.md ./
COPY src ./src
RUN pip install --no-cache-dir -r requirements.lock && pip install --no-cache-dir --no-deps .
RUN useradd --system --home /var/lib/bluestream bluestream && mkdir -p /var/lib/bluestream \
    && chown bluestream /var/lib/bluestream
USER bluestream
EXPOSE 8520
CMD ["bluestream", "serve"]
