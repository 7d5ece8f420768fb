"""Redis backends: ``redis.asyncio`` with pipelines and Lua scripts, shared by every process."""
