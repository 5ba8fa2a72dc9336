# The sidecar image: registrar and templater (the same image, different commands).
#   docker build -t consul-sidecar .
#   docker run -d --net host -v /var/run/docker.sock:/var/run/docker.sock:ro consul-sidecar registrar
#   docker run -d --net host -v ./templates:/templates consul-sidecar templater --template ...
FROM python:3.11-slim-bookworm
RUN apt-get update \
 && apt-get install -y --no-install-recommends haproxy nginx-light \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /app
COPY pyproject.toml README.md ./
COPY registrar registrar
COPY templater templater
COPY sidecar sidecar
COPY templates templates
RUN pip install --no-cache-dir .
ENTRYPOINT []
CMD ["registrar"]
