#!/bin/bash
set -e

BASE="http://localhost:8080"
KEY=""  # Set to your ORHESTRA_AGENT_KEY if configured

# Helper for internal API calls
internal() {
  if [ -n "$KEY" ]; then
    curl -s -H "Content-Type: application/json" -H "X-Orhestra-Key: $KEY" "$@"
  else
    curl -s -H "Content-Type: application/json" "$@"
  fi
}

echo "=== 1. Health Check ==="
curl -s "$BASE/api/v1/health" | jq .

echo -e "\n=== 2. Create Job ==="
JOB=$(curl -s -X POST "$BASE/api/v1/jobs" \
  -H "Content-Type: application/json" \
  -d '{
    "jarPath": "/test/opt.jar",
    "mainClass": "com.test.Main",
    "algorithms": ["PSO"],
    "iterations": {"min": 100, "max": 100, "step": 100},
    "agents": {"min": 10, "max": 10, "step": 10},
    "dimension": {"min": 2, "max": 2, "step": 1}
  }')
echo "$JOB" | jq .
JOB_ID=$(echo "$JOB" | jq -r '.jobId')

echo -e "\n=== 3. Register SPOT (hello) ==="
SPOT=$(internal -X POST "$BASE/internal/v1/hello" -d '{"ipAddress":"127.0.0.1"}')
echo "$SPOT" | jq .
SPOT_ID=$(echo "$SPOT" | jq -r '.spotId')

echo -e "\n=== 4. Heartbeat ==="
internal -X POST "$BASE/internal/v1/heartbeat" \
  -d "{\"spotId\":\"$SPOT_ID\",\"ipAddress\":\"127.0.0.1\",\"cpuLoad\":10.5,\"runningTasks\":0,\"totalCores\":4}" | jq .

echo -e "\n=== 5. Claim Tasks ==="
TASKS=$(internal -X POST "$BASE/internal/v1/tasks/claim" -d "{\"spotId\":\"$SPOT_ID\",\"maxTasks\":10}")
echo "$TASKS" | jq .
TASK_ID=$(echo "$TASKS" | jq -r '.tasks[0].id')

echo -e "\n=== 6. Complete Task ==="
internal -X POST "$BASE/internal/v1/tasks/$TASK_ID/complete" \
  -d "{\"spotId\":\"$SPOT_ID\",\"runtimeMs\":1234,\"iter\":100,\"fopt\":0.001,\"resultJson\":\"{\\\"done\\\":true}\"}" | jq .

echo -e "\n=== 7. Check Job Status ==="
curl -s "$BASE/api/v1/jobs/$JOB_ID" | jq .

echo -e "\n=== 8. Get Results ==="
curl -s "$BASE/api/v1/jobs/$JOB_ID/results" | jq .

echo -e "\n=== 9. List SPOTs ==="
curl -s "$BASE/api/v1/spots" | jq .

echo -e "\n✅ Smoke test complete!"
