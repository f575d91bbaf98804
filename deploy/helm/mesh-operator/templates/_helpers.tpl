{{/* Objects are named after the release: fullnameOverride replaces the name, nameOverride is appended. */}}
{{- define "mesh-operator.name" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else if .Values.nameOverride -}}
{{- printf "%s-%s" .Release.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{/* Cluster-scoped objects (ClusterRoles, admission policies) carry the release namespace too: two
installs with one release name in two namespaces must not share them. */}}
{{- define "mesh-operator.clusterName" -}}
{{- printf "%s-%s" .Release.Namespace (include "mesh-operator.name" .) | trunc 200 | trimSuffix "-" -}}
{{- end -}}

{{/* The app label: nameOverride, else mesh-operator. */}}
{{- define "mesh-operator.app" -}}
{{- .Values.nameOverride | default "mesh-operator" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* The ServiceAccount the replicas run as: the chart's own (named after the release unless named), or
an existing one, which must then be named. */}}
{{- define "mesh-operator.serviceAccount" -}}
{{- if .Values.serviceAccount.create -}}
{{- .Values.serviceAccount.name | default (include "mesh-operator.name" .) -}}
{{- else -}}
{{- required "serviceAccount.name: name the existing ServiceAccount when serviceAccount.create is false" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "mesh-operator.labels" -}}
app.kubernetes.io/name: {{ include "mesh-operator.app" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "mesh-operator.selector" -}}
app.kubernetes.io/name: {{ include "mesh-operator.app" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{/* What the operator may do to MeshPolicies, Pods and Events in a namespace it watches. */}}
{{- define "mesh-operator.namespacedRules" -}}
- apiGroups: [agentmesh.dev]
  resources: [meshpolicies]
  verbs: [get, list, watch, patch, update]
- apiGroups: [agentmesh.dev]
  resources: [meshpolicies/status]
  verbs: [get, patch, update]
- apiGroups: [agentmesh.dev]
  resources: [meshpolicies/finalizers]
  verbs: [update]
- apiGroups: [""]
  resources: [pods]
  verbs: [get, list, watch, patch]
- apiGroups: [events.k8s.io]
  resources: [events]
  verbs: [create, patch]
{{- end -}}

{{/* The job label of the operator's series: the chart's monitor sets it to <namespace>/<name> for either
kind, so two releases of one name in two namespaces stay apart. The alerts select by it. */}}
{{- define "mesh-operator.job" -}}
{{- printf "%s/%s" .Release.Namespace (include "mesh-operator.name" .) -}}
{{- end -}}

{{/* An alert's runbook: its section of docs/operations.md, and a link when runbookBaseURL is set. */}}
{{- define "mesh-operator.runbook" -}}
{{- $root := index . 0 -}}
{{- $anchor := index . 1 -}}
runbook: "docs/operations.md#{{ $anchor }}"
{{- with $root.Values.monitoring.alerts.runbookBaseURL }}
runbook_url: "{{ . }}#{{ $anchor }}"
{{- end }}
{{- end -}}

{{/* Exactly one named object (a join-token Secret, a CA ConfigMap), nothing else of its kind. Watched, not
read per poll: list and watch with resourceNames allow only requests scoped by
fieldSelector=metadata.name to that object. Arguments: the root context, the resource, a name part, and
{namespace, name}. */}}
{{- define "mesh-operator.readOne" -}}
{{- $root := index . 0 -}}
{{- $resource := index . 1 -}}
{{- $part := index . 2 -}}
{{- $ref := index . 3 -}}
{{- $role := printf "%s-%s-%s" (include "mesh-operator.name" $root) $part $ref.name | trunc 253 -}}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: Role
metadata:
  name: {{ $role }}
  namespace: {{ $ref.namespace }}
  labels: {{- include "mesh-operator.labels" $root | nindent 4 }}
rules:
  - apiGroups: [""]
    resources: [{{ $resource }}]
    resourceNames: [{{ $ref.name | quote }}]
    verbs: [list, watch]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: RoleBinding
metadata:
  name: {{ $role }}
  namespace: {{ $ref.namespace }}
  labels: {{- include "mesh-operator.labels" $root | nindent 4 }}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: Role, name: {{ $role }}}
subjects:
  - {kind: ServiceAccount, name: {{ include "mesh-operator.serviceAccount" $root }}, namespace: {{ $root.Release.Namespace }}}
{{- end -}}
