-- wrk script for bench/load.py: one fixed request, and a machine-readable summary.
--
-- The request comes from the environment (BENCH_METHOD, BENCH_BODY or BENCH_BODY_FILE,
-- BENCH_HEADERS as "Name: value" lines) rather than from arguments, so that the API key never shows in `ps`.
-- No request() function is defined: wrk then pre-formats the request once and reuses the bytes,
-- which keeps the load generator cheap.

wrk.method = os.getenv("BENCH_METHOD") or "GET"
local body = os.getenv("BENCH_BODY")
if body ~= nil and body ~= "" then
  wrk.body = body
end
-- A body that is not text (the binary tensor data extension) comes in a file: an environment
-- variable cannot hold a NUL byte.
local body_file = os.getenv("BENCH_BODY_FILE")
if body_file ~= nil and body_file ~= "" then
  local file = assert(io.open(body_file, "rb"))
  wrk.body = file:read("*a")
  file:close()
end
for line in (os.getenv("BENCH_HEADERS") or ""):gmatch("[^\n]+") do
  local name, value = line:match("^([^:]+):%s*(.*)$")
  if name ~= nil then
    wrk.headers[name] = value
  end
end

local threads = {}

function setup(thread)
  table.insert(threads, thread)
  thread:set("thread_id", #threads)
end

function init(args)
  -- Globals of this thread's Lua state, read back by done() through thread:get().
  non2xx = 0
  statuses = {}
  sent = 0
  run_id = tostring(os.time())
end

-- BENCH_IDEMPOTENCY_KEYS=1: a new Idempotency-Key on every request (thread, counter and the
-- run's start make it unique), so each request is formatted anew: a cost wrk's fixed request
-- does not have, on the load generator's side.
if os.getenv("BENCH_IDEMPOTENCY_KEYS") == "1" then
  function request()
    sent = sent + 1
    wrk.headers["Idempotency-Key"] = string.format('"bench-%s-%d-%d"', run_id, thread_id, sent)
    return wrk.format()
  end
end

-- wrk itself only counts statuses above 399; every non-2xx is a failure here.
function response(status, headers, body)
  if status < 200 or status > 299 then
    non2xx = non2xx + 1
    local key = tostring(status)
    statuses[key] = (statuses[key] or 0) + 1
  end
end

function done(summary, latency, requests)
  local bad = 0
  local by_status = {}
  for _, thread in ipairs(threads) do
    bad = bad + (thread:get("non2xx") or 0)
    for status, count in pairs(thread:get("statuses") or {}) do
      by_status[status] = (by_status[status] or 0) + count
    end
  end
  local parts = {}
  for status, count in pairs(by_status) do
    table.insert(parts, string.format('"%s":%d', status, count))
  end
  local e = summary.errors
  io.write(string.format(
    'BENCH_RESULT {"requests":%d,"duration_us":%d,"bytes":%d,'
      .. '"latency_us":{"p50":%d,"p90":%d,"p99":%d,"mean":%.1f,"max":%d},'
      .. '"errors":{"connect":%d,"read":%d,"write":%d,"timeout":%d,"status":%d},'
      .. '"non2xx":%d,"statuses":{%s}}\n',
    summary.requests, summary.duration, summary.bytes,
    latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency.mean, latency.max,
    e.connect, e.read, e.write, e.timeout, e.status,
    bad, table.concat(parts, ",")))
end
