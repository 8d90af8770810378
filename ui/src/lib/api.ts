// Typed calls: each wrapper names the command and the result type it answers with.
import type { AppInfo } from "../bindings/AppInfo";
import type { ChatAnswer } from "../bindings/ChatAnswer";
import type { ChatRecord } from "../bindings/ChatRecord";
import type { CompareRequest } from "../bindings/CompareRequest";
import type { Comparison } from "../bindings/Comparison";
import type { CreateChat } from "../bindings/CreateChat";
import type { CreateRun } from "../bindings/CreateRun";
import type { DatasetRecord } from "../bindings/DatasetRecord";
import type { DownloadJob } from "../bindings/DownloadJob";
import type { DownloadRequest } from "../bindings/DownloadRequest";
import type { Estimate } from "../bindings/Estimate";
import type { FormSchema } from "../bindings/FormSchema";
import type { HubRepo } from "../bindings/HubRepo";
import type { ImportRequest } from "../bindings/ImportRequest";
import type { ModelRecord } from "../bindings/ModelRecord";
import type { Preview } from "../bindings/Preview";
import type { PreviewRequest } from "../bindings/PreviewRequest";
import type { RunAdapter } from "../bindings/RunAdapter";
import type { RunChartRequest } from "../bindings/RunChartRequest";
import type { RunConfig } from "../bindings/RunConfig";
import type { RunDetail } from "../bindings/RunDetail";
import type { RunRecord } from "../bindings/RunRecord";
import type { RunStatus } from "../bindings/RunStatus";
import type { SampleOptions } from "../bindings/SampleOptions";
import { pickBackend, type Backend } from "./backend";

export const backend: Backend = pickBackend();
const c = backend;

export const api = {
  info: () => c.call<AppInfo>({ command: "info" }),
  schema: () => c.call<FormSchema>({ command: "schema" }),
  models: () => c.call<ModelRecord[]>({ command: "models" }),
  addModel: (path: string) => c.call<ModelRecord>({ command: "add_model", args: { path } }),
  hubLookup: (repo: string, revision: string | null) => c.call<HubRepo>({ command: "hub_lookup", args: { repo, revision } }),
  downloadModel: (args: DownloadRequest) => c.call<DownloadJob>({ command: "download_model", args }),
  downloads: () => c.call<DownloadJob[]>({ command: "downloads" }),
  cancelDownload: (id: number) => c.call<null>({ command: "cancel_download", args: { id } }),
  datasets: () => c.call<DatasetRecord[]>({ command: "datasets" }),
  importDataset: (args: ImportRequest) => c.call<DatasetRecord>({ command: "import_dataset", args }),
  previewDataset: (args: PreviewRequest) => c.call<Preview>({ command: "preview_dataset", args }),
  deleteDataset: (id: number) => c.call<null>({ command: "delete_dataset", args: { id } }),
  runs: () => c.call<RunRecord[]>({ command: "runs" }),
  runDetail: (id: number) => c.call<RunDetail>({ command: "run_detail", args: { id } }),
  validateConfig: (config: unknown) => c.call<RunConfig>({ command: "validate_config", args: { config } }),
  estimate: (config: RunConfig) => c.call<Estimate>({ command: "estimate", args: { config } }),
  createRun: (args: CreateRun) => c.call<RunRecord>({ command: "create_run", args }),
  stopRun: (id: number) => c.call<RunStatus>({ command: "stop_run", args: { id } }),
  resumeRun: (id: number) => c.call<RunRecord>({ command: "resume_run", args: { id } }),
  cancelQueued: (id: number) => c.call<null>({ command: "cancel_queued", args: { id } }),
  deleteRun: (id: number, delete_files: boolean) => c.call<null>({ command: "delete_run", args: { id, delete_files } }),
  runChartSvg: (args: RunChartRequest) => c.call<string>({ command: "run_chart_svg", args }),
  runChartPng: (args: RunChartRequest) => c.call<string>({ command: "run_chart_png", args }),
  compare: (args: CompareRequest) => c.call<Comparison>({ command: "compare", args }),
  compareChartSvg: (args: CompareRequest) => c.call<string>({ command: "compare_chart_svg", args }),
  compareChartPng: (args: CompareRequest) => c.call<string>({ command: "compare_chart_png", args }),
  runAdapter: (run_id: number, step: number | null = null) => c.call<RunAdapter>({ command: "run_adapter", args: { run_id, step } }),
  chats: () => c.call<ChatRecord[]>({ command: "chats" }),
  chat: (id: number) => c.call<ChatRecord>({ command: "chat", args: { id } }),
  createChat: (args: CreateChat) => c.call<ChatRecord>({ command: "create_chat", args }),
  deleteChat: (id: number) => c.call<null>({ command: "delete_chat", args: { id } }),
  setChatSampling: (id: number, sampling: SampleOptions) => c.call<null>({ command: "set_chat_sampling", args: { id, sampling } }),
  chatSend: (chat_id: number, text: string) => c.call<ChatAnswer[]>({ command: "chat_send", args: { chat_id, text } }),
  chatCancel: (chat_id: number) => c.call<null>({ command: "chat_cancel", args: { chat_id } }),
};

export function errorText(e: unknown): string {
  return e instanceof Error ? e.message : String(e);
}
