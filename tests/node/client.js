// Interoperability check: a Node.js client built only from our .proto files.
// Usage: node client.js TARGET PROTO_DIR JOB.json  -> prints one JSON line.
"use strict";
const fs = require("fs");
const path = require("path");
const grpc = require("@grpc/grpc-js");
const protoLoader = require("@grpc/proto-loader");

const [target, protoDir, jobFile] = process.argv.slice(2);
const job = JSON.parse(fs.readFileSync(jobFile, "utf8"));
const definition = protoLoader.loadSync(
  ["entremise/v1/partner_service.proto", "entremise/v1/compliance_service.proto"],
  { includeDirs: [protoDir], keepCase: true, longs: String, enums: String, defaults: true },
);
const v1 = grpc.loadPackageDefinition(definition).entremise.v1;
const credentials = grpc.credentials.createInsecure();
const partner = new v1.PartnerService(target, credentials);
const compliance = new v1.ComplianceService(target, credentials);

function metadata(token) {
  const md = new grpc.Metadata();
  md.set("authorization", `Bearer ${token}`);
  return md;
}

const payload = fs.readFileSync(job.payload_file);
const call = partner.UploadDataset(metadata(job.partner_token), (err, response) => {
  if (err) {
    console.log(JSON.stringify({ ok: false, stage: "upload", code: err.code, details: err.details }));
    process.exit(1);
  }
  compliance.GetBudget({ agreement_id: job.agreement_id }, metadata(job.officer_token), (err2, budget) => {
    if (err2) {
      console.log(JSON.stringify({ ok: false, stage: "budget", code: err2.code, details: err2.details }));
      process.exit(1);
    }
    console.log(JSON.stringify({
      ok: true,
      dataset_id: response.dataset.dataset_id,
      row_count: response.dataset.row_count,
      version: response.dataset.version,
      budget: budget.budgets[0],
    }));
    process.exit(0);
  });
});
call.write({ header: job.header });
const chunk = 64 * 1024;
for (let offset = 0; offset < payload.length; offset += chunk) {
  call.write({ chunk: payload.subarray(offset, offset + chunk) });
}
call.end();
