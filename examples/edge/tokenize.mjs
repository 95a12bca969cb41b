// Token ids of texts as llama.cpp tokenizes them (node-llama-cpp's prebuilt binary; only the vocabulary is loaded).
//
//   node tokenize.mjs MODEL.gguf TEXTS.json OUT.json
//
// TEXTS: a JSON list of strings. OUT: {"text": [...], "special": [...]}, one id list per text in each, without BOS:
// "text" leaves the text of control tokens as text (model.tokenize(text, false)), "special" parses it into those
// tokens (model.tokenize(text, true)). llama.cpp splits user-defined tokens off in both.
import fs from "node:fs";
import {getLlama, LlamaLogLevel} from "node-llama-cpp";

const [modelPath, textsPath, outPath] = process.argv.slice(2);
const texts = JSON.parse(fs.readFileSync(textsPath, "utf8"));
const llama = await getLlama({gpu: false, build: "never", logLevel: LlamaLogLevel.error});
const model = await llama.loadModel({modelPath, vocabOnly: true});
const tokenize = (special) => texts.map((text) => Array.from(model.tokenize(text, special)));
fs.writeFileSync(outPath, JSON.stringify({text: tokenize(false), special: tokenize(true)}));
await model.dispose();
await llama.dispose();
