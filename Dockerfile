# One image for every computenet process; docker-compose.yml picks the command.
FROM python:3.11-slim
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
WORKDIR /app
COPY pyproject.toml ./
COPY services ./services
COPY gateway ./gateway
COPY deploy ./deploy
RUN pip install .
USER nobody
