FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY domain domain
COPY schemas schemas
COPY streaming streaming
COPY projections projections
COPY sagas sagas
COPY api api
COPY service service
RUN pip install --no-cache-dir .
ENTRYPOINT ["tadpole"]
