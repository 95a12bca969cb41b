// Answer a question in llama.cpp (node-llama-cpp's prebuilt binary) from its own prefill of the cached tokens and
// from sequence-state files (`kvc export --to llama.cpp` outputs) loaded with no prefill.
//
//   node llama_cpp_answer.mjs REQUEST.json OUT_DIR
//
// REQUEST: {"model": GGUF path, "prefix_ids": [...], "question": text (laid out with the .kvc's question prefix and
// suffix already), "tokens": 32, "threads": 2, "flash_attention": true, "kv_type": "F16", "states": {name: path},
// "prefill": true}. The "prefill" run evaluates prefix_ids itself (skipped when "prefill" is false); each state run
// loads its file instead. OUT_DIR/result.json gets the question's token ids and, per run, the greedy answer's token
// ids and seconds; OUT_DIR/<run>.f32 holds the next-token probabilities (the whole softmax: temperature 1, no top-k
// or top-p cut) along the prefill run's greedy answer (or the run's own without one), teacher-forced: tokens ×
// vocabulary float32. A state the runtime refuses fails the process with llama.cpp's message on stderr.
import fs from "node:fs";
import path from "node:path";
import {getLlama, LlamaLogLevel} from "node-llama-cpp";

const [requestPath, outDir] = process.argv.slice(2);
const request = JSON.parse(fs.readFileSync(requestPath, "utf8"));
fs.mkdirSync(outDir, {recursive: true});

const llama = await getLlama({gpu: false, build: "never", logLevel: LlamaLogLevel.error});
const model = await llama.loadModel({modelPath: request.model});
const context = await model.createContext({
    contextSize: request.context_size ?? Math.max(512, request.prefix_ids.length + 256),
    threads: request.threads ?? 2,
    flashAttention: request.flash_attention ?? true,
    experimentalKvCacheKeyType: request.kv_type ?? "F16",
    experimentalKvCacheValueType: request.kv_type ?? "F16",
    sequences: 1,
});
const sequence = context.getSequence();
const questionIds = Array.from(model.tokenize(request.question, true));
const vocabulary = model.fileInfo.metadata.tokenizer.ggml.tokens.length;

// Greedy tokens through the iterator's next(): a `for await ... break` over evaluate() can hang.
async function greedy(ids, count) {
    const out = [];
    const iterator = sequence.evaluate(ids, {temperature: 0})[Symbol.asyncIterator]();
    while (out.length < count) {
        const step = await iterator.next();
        if (step.done) break;
        out.push(step.value);
        if (model.isSpecialToken(step.value) && step.value === model.tokens.eos) break;
    }
    await iterator.return?.();
    return out;
}

// Next-token probabilities after the question and after each reference token but the last (teacher-forced).
async function teacherForced(reference) {
    const ids = [...questionIds, ...reference.slice(0, -1)];
    const items = ids.map((token, i) => i < questionIds.length - 1 ? token
        : [token, {generateNext: {probabilities: true, options: {temperature: 1, topK: 0, topP: 1, minP: 0}}}]);
    const outputs = await sequence.controlledEvaluate(items);
    const probs = new Float32Array(reference.length * vocabulary);
    outputs.slice(questionIds.length - 1).forEach((output, row) => {
        for (const [token, p] of output.next.probabilities) probs[row * vocabulary + token] = p;
    });
    return probs;
}

async function run(name, reference, prepare) {  // reference: null to take this run's own answer
    const started = performance.now();
    await prepare();
    const ready = performance.now();
    const answer = await greedy(questionIds, request.tokens ?? 32);
    const answered = performance.now();
    reference = reference ?? answer;
    const tail = sequence.contextTokens.length - request.prefix_ids.length;
    await sequence.eraseContextTokenRanges([{start: request.prefix_ids.length, end: request.prefix_ids.length + tail}]);
    fs.writeFileSync(path.join(outDir, `${name}.f32`), Buffer.from((await teacherForced(reference)).buffer));
    return {answer_ids: answer, answer: model.detokenize(answer), ready_seconds: (ready - started) / 1000,
            answer_seconds: (answered - ready) / 1000};
}

const result = {question_ids: questionIds, vocabulary, runs: {}};
if (request.prefill ?? true) {
    result.runs.prefill = await run("prefill", null, async () => {
        await sequence.evaluateWithoutGeneratingNewTokens(request.prefix_ids);
    });
}
for (const [name, state] of Object.entries(request.states ?? {})) {
    await sequence.clearHistory();
    result.runs[name] = await run(name, result.runs.prefill?.answer_ids ?? null, async () => {
        try {
            await sequence.loadStateFromFile(state, {acceptRisk: true});
        } catch (error) {
            await new Promise((resolve) => setTimeout(resolve, 200));  // llama.cpp's own log lines arrive async
            console.error(`state ${name} refused: ${error.message}`);
            process.exit(2);
        }
    });
}
fs.writeFileSync(path.join(outDir, "result.json"), JSON.stringify(result));
process.exit(0);  // node-llama-cpp keeps the event loop alive
