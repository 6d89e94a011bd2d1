#!/usr/bin/env node
await import('../dist/agent/main.js');
