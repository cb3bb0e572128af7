# One image for the producer, the workers and the searcher.
FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
WORKDIR /app
COPY pyproject.toml README.md ./
COPY common ./common
COPY producer ./producer
COPY worker ./worker
COPY searcher ./searcher
COPY stack ./stack
COPY demo ./demo
RUN pip install --no-cache-dir '.[nsfw]'
USER 10001
ENTRYPOINT ["python", "-m"]
