"""Lua scripts of the corrections store (`finetune.corrections`): each write is one script, so readers never see
half an annotation and counts stay consistent. The keys they touch are listed in `finetune.corrections`'s docstring."""

_PUT = """
-- KEYS: 1 ann, 2 idx, 3 seq, 4 projects, 5 where, 6 refs, 7 img(new), 8 review
-- ARGV: 1 member, 2 project, 3 ann id, 4 where value, 5 sha, 6 image bytes, 7 meta json, 8 img prefix,
--       9 now, 10 context json (kept verbatim: cjson would turn its empty lists into objects), 11.. mask bytes
local new = cjson.decode(ARGV[7])
local old_raw = redis.call('HGET', KEYS[1], 'meta')
local old = nil
local seq = nil
local created = ARGV[9]
if old_raw then
  old = cjson.decode(old_raw)
  if tonumber(old.updated) > tonumber(new.updated) then return {'stale', 0} end
  if tonumber(old.updated) == tonumber(new.updated) and tonumber(new.updated) > 0 then
    seq = redis.call('HGET', KEYS[1], 'seq')   -- same annotation version delivered again: not a new correction
  end
  created = tostring(old.created)
  for _, r in ipairs(old.review) do
    local left = redis.call('HINCRBY', KEYS[8], r[1] .. '|n', -1)
    redis.call('HINCRBYFLOAT', KEYS[8], r[1] .. '|sum', -r[2])
    if left <= 0 then redis.call('HDEL', KEYS[8], r[1] .. '|n', r[1] .. '|sum') end
  end
end
if (not old) or old.image ~= ARGV[5] then
  redis.call('SET', KEYS[7], ARGV[6], 'NX')
  redis.call('HINCRBY', KEYS[6], ARGV[5], 1)
  if old then
    if redis.call('HINCRBY', KEYS[6], old.image, -1) <= 0 then
      redis.call('HDEL', KEYS[6], old.image)
      redis.call('DEL', ARGV[8] .. old.image)
    end
  end
end
if not seq then seq = redis.call('INCR', KEYS[3]) end
new.created = tonumber(created)
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], 'meta', cjson.encode(new), 'seq', seq, 'context', ARGV[10])
for i = 11, #ARGV do redis.call('HSET', KEYS[1], 'm:' .. (i - 11), ARGV[i]) end
for _, r in ipairs(new.review) do
  redis.call('HINCRBY', KEYS[8], r[1] .. '|n', 1)
  redis.call('HINCRBYFLOAT', KEYS[8], r[1] .. '|sum', r[2])
end
redis.call('ZADD', KEYS[2], seq, ARGV[1])
redis.call('SADD', KEYS[4], ARGV[2])
redis.call('HSET', KEYS[5], ARGV[3], ARGV[4])
if old then return {'replaced', seq} end
return {'stored', seq}
"""

_DELETE = """
-- KEYS: 1 ann, 2 idx, 3 where, 4 refs, 5 review, 6 projects ; ARGV: 1 member, 2 ann id, 3 img prefix, 4 project
local old_raw = redis.call('HGET', KEYS[1], 'meta')
redis.call('HDEL', KEYS[3], ARGV[2])
if not old_raw then return 0 end
local old = cjson.decode(old_raw)
if redis.call('HINCRBY', KEYS[4], old.image, -1) <= 0 then
  redis.call('HDEL', KEYS[4], old.image)
  redis.call('DEL', ARGV[3] .. old.image)
end
for _, r in ipairs(old.review) do
  local left = redis.call('HINCRBY', KEYS[5], r[1] .. '|n', -1)
  redis.call('HINCRBYFLOAT', KEYS[5], r[1] .. '|sum', -r[2])
  if left <= 0 then redis.call('HDEL', KEYS[5], r[1] .. '|n', r[1] .. '|sum') end
end
redis.call('DEL', KEYS[1])
redis.call('ZREM', KEYS[2], ARGV[1])
if redis.call('ZCARD', KEYS[2]) == 0 then redis.call('SREM', KEYS[6], ARGV[4]) end
return 1
"""

_SET_PROMPTS = """
-- KEYS: 1 ann ; ARGV: 1 prompts json (one per region, in order). Returns 1, or 0 when the annotation is gone or
-- its region count changed since it was read.
local raw = redis.call('HGET', KEYS[1], 'meta')
if not raw then return 0 end
local meta = cjson.decode(raw)
local prompts = cjson.decode(ARGV[1])
if #prompts ~= #meta.regions then return 0 end
for i, p in ipairs(prompts) do meta.regions[i].prompt = p end
redis.call('HSET', KEYS[1], 'meta', cjson.encode(meta))
return 1
"""

_MARK = """
-- KEYS: 1 trained ; ARGV: 1 upto. The watermark only moves forward.
local cur = tonumber(redis.call('GET', KEYS[1]) or '0')
local upto = tonumber(ARGV[1])
if upto > cur then redis.call('SET', KEYS[1], ARGV[1]); return upto end
return cur
"""
