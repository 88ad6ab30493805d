-- One CRUD case for wrk, rotating over the benchmark's users and their tasks, so that
-- PATCHes and creates do not all queue on one user's row lock.
--   wrk -s bench/wrk/crud.lua URL -- <healthz|retrieve|list|create|patch> <accounts file>
-- The accounts file has one line per user: "<access token> <task id>,<task id>,...".
-- At the end it prints one line "WRK_RESULT {json}" for bench/cases/crud.py.

local next_thread = 0

function setup(thread)
   next_thread = next_thread + 1
   thread:set("thread_id", next_thread)
end

local case, users, counter = nil, {}, 0

function init(args)
   case = args[1]
   for line in io.lines(args[2]) do
      local token, ids = line:match("^(%S+)%s+(%S+)$")
      local tasks = {}
      for id in ids:gmatch("%d+") do
         tasks[#tasks + 1] = id
      end
      users[#users + 1] = { auth = "Bearer " .. token, tasks = tasks }
   end
   -- Threads start at different users.
   counter = (thread_id or 1) * 7919
end

function request()
   counter = counter + 1
   if case == "healthz" then
      return wrk.format("GET", "/healthz")
   end
   local user = users[counter % #users + 1]
   local task = user.tasks[math.floor(counter / #users) % #user.tasks + 1]
   local headers = { ["Authorization"] = user.auth }
   if case == "retrieve" then
      return wrk.format("GET", "/api/tasks/" .. task .. "/", headers)
   elseif case == "list" then
      return wrk.format("GET", "/api/tasks/?limit=20", headers)
   end
   headers["Content-Type"] = "application/json"
   if case == "create" then
      return wrk.format("POST", "/api/tasks/", headers, '{"title": "wrk ' .. counter .. '"}')
   elseif case == "patch" then
      -- A title no other thread writes: every PATCH is a change (a version, an event).
      local title = '{"title": "wrk ' .. thread_id .. "-" .. counter .. '"}'
      return wrk.format("PATCH", "/api/tasks/" .. task .. "/", headers, title)
   end
   error("unknown case " .. tostring(case))
end

function done(summary, latency, requests)
   local e = summary.errors
   io.write(string.format(
      'WRK_RESULT {"requests": %d, "duration_us": %d, "connect_errors": %d, "read_errors": %d,'
         .. ' "write_errors": %d, "status_errors": %d, "timeouts": %d, "p50_us": %d,'
         .. ' "p99_us": %d, "max_us": %d, "mean_us": %.1f}\n',
      summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
      latency:percentile(50), latency:percentile(99), latency.max, latency.mean))
end
