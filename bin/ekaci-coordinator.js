#!/usr/bin/env node
await import('../dist/cli/ekaci-coordinator.js');
